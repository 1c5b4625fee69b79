"""An evaluator holds one model resident and scores recipes against it.

Base weights and task vectors arrive once (from Ray's object store as read-only numpy arrays,
zero-copy on one node); each candidate is merged straight into the parameters of a live model,
so there is no per-candidate load, allocation or copy of a whole model. The class is plain
Python: the runner wraps it with ``ray.remote``; tests and ``evo export`` use it directly.
"""
from __future__ import annotations

import math
import os
import resource
import time
import traceback
from contextlib import contextmanager
from typing import Mapping, Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evo.core.errors import EvoError
from evo.core.tensors import DTYPES, from_numpy
from evo.scoring.fitness import block_nlls
from evo.merge import Merger
from evo.scoring.rejection import RejectionTest, Threshold
from evo.search.recipe import Recipe


def _resolve(value):
    """A value, or the object a nested Ray reference points to (Ray resolves only top-level
    arguments; the pool sends each source as its own object)."""
    if type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


def build_model(model_config: dict, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """An empty model of the sources' architecture; the merge writes its weights."""
    config = AutoConfig.for_model(**model_config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class Evaluator:
    """Merges recipes into a resident model and measures them on fixed token blocks.

    Args:
        base: base-model tensors by name; None when the sources arrive with :meth:`update`
            (the pool's actors: see ``evo.cluster.pool``).
        deltas: task vectors, ``deltas[model][tensor]``.
        model_config: ``config.to_dict()`` of the base model.
        eval_sets: ``{collection: {set name: int64 blocks [n, seq_len]}}``, e.g. ``valid`` (search
            fitness) and ``test`` (final report).
        tasks: ``{name: evo.scoring.tasks.Task}`` scored after perplexity (pre-tokenised, picklable).
        rejection: the early-rejection test (``evo.scoring.rejection.RejectionTest``; default chunks 4,
            z 3, margin 0).
        dtype: the resident model's dtype (``float32``, ``bfloat16``, ``float16``).
        stream_sources: keep base and task vectors in host memory and copy each tensor to the
            device as it is merged (a GPU that cannot hold them beside the model).
    """

    def __init__(
        self,
        base: Mapping[str, np.ndarray] | None,
        deltas: Mapping[str, Mapping[str, np.ndarray]] | None,
        model_config: dict,
        eval_sets: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        *,
        threads: int = 1,
        device: str = "cpu",
        batch_size: int = 8,
        name: str = "evaluator",
        tasks: Mapping | None = None,
        rejection: RejectionTest | None = None,
        train: np.ndarray | None = None,
        task_items: Mapping | None = None,
        dtype: str = "float32",
        stream_sources: bool = False,
    ):
        torch.set_num_threads(threads)
        self.name = name
        self.device = device
        self.batch_size = batch_size
        # the resident model in the experiment's dtype: each tensor is merged in float32 (the
        # stored base and task vectors, in the same dtype, are widened per tensor) and rounded
        # once into it, as the exported release is, with forward passes in that dtype
        self.model = build_model(model_config, dtype=DTYPES[dtype], device=device)
        self.model_config = dict(model_config)
        self.resident: dict = {}  # whole source models, built on a data-flow path's first use (evo.scoring.path)
        self.num_layers = int(model_config.get("num_hidden_layers", 1))
        self.merger = None
        self.stream_sources = stream_sources  # sources stay in host memory, copied per tensor (evo.cluster.memory)
        self.task_items = dict(task_items or {})  # search ("valid") scores these items; other collections all
        self.rejection = rejection or RejectionTest()
        self.tasks: dict = {}
        self.train = None
        self.eval_sets: dict = {}
        if base is not None:
            self._load(base, deltas or {}, eval_sets or {}, tasks, train)

    epoch = 0  # which data update this evaluator holds (0: the constructor's, or none yet)

    def _load(self, base, deltas, eval_sets, tasks, train) -> None:
        self.merger = Merger(
            from_numpy(base),
            {m: from_numpy(d) for m, d in deltas.items()},
            num_layers=self.num_layers,
            out=self.model.state_dict(),
            device=self.device,
            resident=True,
            stream_sources=self.stream_sources,
        )
        self.tasks = dict(tasks or {})
        self.train = _training_data(train)
        self._set_eval_sets(eval_sets)

    def _set_eval_sets(self, eval_sets) -> None:
        self.eval_sets = {
            coll: {name: torch.from_numpy(np.array(blocks, dtype=np.int64)) for name, blocks in sets.items()}
            for coll, sets in eval_sets.items()
        }

    def update(self, epoch: int, eval_sets=None, train=None, deltas=None, *, base=None, sources=None,
               tasks=None) -> int:
        """Swap in new data without restarting: evaluation blocks, LoRA training blocks and
        replaced task vectors (``{model: {tensor: array}}``). ``base``/``sources``/``tasks``: the
        run's fixed sources, loaded by an evaluator that has none yet (a new actor, or one Ray
        restarted) and ignored by one that has them. Returns the pid (a readiness probe)."""
        if self.merger is None:
            if base is None:
                raise EvoError(f"{self.name}: the first update must carry the base model and sources")
            self._load(_resolve(base), {m: _resolve(d) for m, d in (sources or {}).items()}, eval_sets or {}, tasks, train)
        else:
            if eval_sets is not None:
                self._set_eval_sets(eval_sets)
            if train is not None:
                self.train = _training_data(train)
        for model, delta in (deltas or {}).items():
            self.merger.set_delta(model, from_numpy(delta))
            self.resident.pop(model, None)
        self.epoch = epoch
        return os.getpid()

    def __repr__(self) -> str:  # the dashboard's Repr column
        return f"Evaluator({self.name}, device={self.device}, pid={os.getpid()})"

    def block_scores(self, recipe: dict, sets: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Per-block mean NLL of ``recipe`` on arbitrary ``sets`` of blocks (studies of which
        blocks to score, e.g. ``experiments/bench_search.py``); no LoRA, no rejection."""
        rec = Recipe.from_dict(recipe)
        if rec.lora:
            raise ValueError("block_scores scores merges, not LoRA fits")
        with self._candidate(rec) as (model, _):
            return {name: block_nlls(model, blocks, self.batch_size, self.device).numpy()
                    for name, blocks in sets.items()}

    @contextmanager
    def _candidate(self, rec: Recipe):
        """(model, LoRA fit statistics) of a recipe, for the duration of the block: its merge written into the
        resident model, then its LoRA fitted on it (removed after) or its data-flow path run through
        it (evo.scoring.path; the resident model is restored after)."""
        if rec.path is not None and rec.lora:
            raise ValueError("a recipe with a data-flow path cannot have LoRA genes (not supported yet)")
        if rec.path is None or rec.path.uses_merge:
            self.merger.merge(rec.merge, seed=rec.seed)
        if rec.path is not None:
            from evo.scoring.path import path_model

            with path_model(self.model, rec.path, self._resident_model) as model:
                yield model, None
            return
        model, stats = self.model, None
        if rec.lora:
            model, stats = self._fit_lora(rec)
        try:
            yield model, stats
        finally:
            if model is not self.model:
                from evo.scoring.lora import unload

                unload(model)  # the resident model must be bare for the next candidate

    def _resident_model(self, name: str):
        """Source model ``name`` (or the base) as a whole model, for data-flow paths; built once."""
        if name not in self.resident:
            from evo.scoring.path import resident_model

            if name != "base" and name not in self.merger.deltas:
                raise ValueError(f"a path step names model {name!r}, which this evaluator does not hold "
                                 f"(it holds base, {', '.join(self.merger.deltas)})")
            self.resident[name] = resident_model(
                lambda: build_model(self.model_config, dtype=self.model.dtype, device=self.device),
                self.merger.base, self.merger.deltas.get(name), self.device)
        return self.resident[name]

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, recipe: dict, collection: str = "valid", reject_above: Threshold | None = None,
                 epoch: int = 0, blocks: Mapping[str, Sequence[int]] | None = None) -> dict:
        """Score one recipe. Never raises for a bad candidate: returns ``status: failed``.

        ``reject_above``: early rejection against the current k-th best (``evo.scoring.rejection``): its
        mean log-perplexity (a bound from the spread over blocks) and, when known, its per-block
        scores for a paired test on the same blocks (block difficulty cancels, so a worse
        candidate is recognised after far fewer blocks). A rejected candidate comes back
        ``rejected`` with its estimate as its metrics. ``epoch``: the data update the caller
        expects; an evaluator holding another (one Ray restarted from its constructor) answers
        ``stale``. ``blocks``: ``{set: row indices}`` of the collection to score (a generation's
        draw from the search pool); default every block. Results that were not rejected carry
        ``block_nlls`` (per set): paired references and confidence intervals are built from them.
        """
        if epoch != self.epoch or self.merger is None:
            return {"status": "stale", "epoch": self.epoch}
        t0 = time.perf_counter()
        try:
            rec = Recipe.from_dict(recipe)
            with self._candidate(rec) as (model, lora_stats):
                t1 = time.perf_counter()
                sets = self.eval_sets[collection]
                if blocks is not None:
                    sets = {name: b[torch.as_tensor(list(blocks[name]), dtype=torch.long)] for name, b in sets.items()}
                metrics, fraction, rejected, nlls = self._perplexities(model, sets, reject_above)
                t2 = time.perf_counter()
                if not rejected:
                    for name, task in self.tasks.items():
                        items = self.task_items.get(name) if collection == "valid" else None
                        value = task.score(model, batch_size=self.batch_size, device=self.device, items=items)["value"]
                        if not math.isfinite(value):
                            raise FloatingPointError(f"non-finite score on task {name!r}")
                        metrics[f"task/{name}"] = value
            t3 = time.perf_counter()
            out = {
                "status": "rejected" if rejected else "ok",
                "metrics": metrics,
                "evaluated_fraction": fraction,
                "lora": lora_stats,
                "timings": {"merge_s": t1 - t0, "ppl_s": t2 - t1, "tasks_s": t3 - t2, "eval_s": t3 - t1},
                "worker": self._worker(),
            }
            if not rejected:
                out["block_nlls"] = {k: [round(float(x), 6) for x in v] for k, v in nlls.items()}
            return out
        except Exception as exc:  # a candidate's own failure is data, not a crash
            return {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5),
                "timings": {"total_s": time.perf_counter() - t0},
                "worker": self._worker(),
            }

    def _worker(self) -> dict:
        """Where a result was computed: process, evaluator, Ray node (None outside Ray), memory."""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:
            node = None
        return {"pid": os.getpid(), "name": self.name, "node": node, "peak_rss_mb": _peak_rss_mb()}

    def _fit_lora(self, rec: Recipe):
        from evo.scoring.lora import LoraGenes, fit_lora

        if self.train is None:
            raise ValueError("recipe has LoRA genes but the experiment has no training data (eval.train_sets)")
        genes = LoraGenes.from_dict(rec.lora)
        model, stats = fit_lora(self.model, self.train, genes, seed=rec.seed, device=self.device)
        model.eval()
        return model, {k: v for k, v in stats.items() if isinstance(v, (int, float))}

    def _perplexities(self, model, sets: Mapping[str, torch.Tensor], reject_above):
        """Per-set log-perplexity, in chunks when a rejection threshold is given.

        Returns (metrics, fraction of blocks evaluated, rejected?, per-block NLLs by set)."""
        test = self.rejection
        threshold = test.usable(reject_above, sets) if reject_above is not None else None
        chunks = test.chunks if threshold is not None else 1
        parts = {name: torch.tensor_split(torch.arange(len(b)), chunks) for name, b in sets.items()}
        nlls: dict[str, list[torch.Tensor]] = {name: [] for name in sets}
        total = sum(len(b) for b in sets.values())
        for c in range(chunks):
            for name, blocks in sets.items():
                idx = parts[name][c]
                if len(idx):
                    nlls[name].append(block_nlls(model, blocks[idx], self.batch_size, self.device))
            done = {name: torch.cat(v) for name, v in nlls.items() if v}
            for name, v in done.items():
                if not torch.isfinite(v).all():
                    raise FloatingPointError(f"non-finite loss on evaluation set {name!r}")
            metrics = {f"logppl/{name}": float(v.mean()) for name, v in done.items()}
            seen = sum(len(v) for v in done.values())
            if c == chunks - 1 or len(done) != len(sets):
                continue
            estimate = test.verdict(done, threshold)
            if estimate is not None:
                return estimate, seen / total, True, done
        return metrics, 1.0, False, done


def _training_data(train):
    """LoRA training blocks as int64 tensors (a bare array, or newest + rehearsal); None if empty."""
    from evo.scoring.lora import TrainingData

    if train is None or not len(train):  # a TrainingData's length is its newest blocks'
        return None
    return TrainingData.of(train)


def _peak_rss_mb() -> int:
    """This process's peak resident set (the object store's shared pages it touched included)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
