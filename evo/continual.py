"""The never-ending loop: follow a folder of data shards, adapt on each new version, release.

For every new data version (one shard at a time, oldest first):

1. **install**: the newest version's held-out split becomes the evaluation set ``newest``; a
   bounded, seeded sample of everything older (earlier versions' held-out text and the static
   ``eval.sets``) becomes ``replay``; LoRA genes train on the newest training split. The
   current release joins the merge as the source model ``release`` (its weights minus the
   base; zero before the first release), so a candidate can build on what was shipped.
2. **re-evaluate**: the current release and every candidate the optimizer remembers
   (population, hall of fame, Pareto front) are measured on the new data and the optimizer's
   fitness is replaced (old values stay in ``candidates.jsonl``, tagged with their version);
   the next generation is seeded with "release + LoRA on the newest data" and the best so far.
3. **evolve** ``stream.generations`` generations.
4. **release** by the rule of :class:`evo.config.ReleaseConfig`; the release records its data
   versions, parent release and lineage.

Each step checkpoints (``Checkpoint.stream`` says where the loop is), so ``evo resume``
continues at the step it was in, and the fitness cache means nothing finished is redone.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from evo.checkpoint import Checkpoint
from evo.config import ExperimentConfig
from evo.data import DataStream
from evo.errors import EvoError
from evo.gguf import model_dirs
from evo.generation import (  # noqa: F401  (RELEASE, make_stream_space: re-exported)
    RELEASE, GenerationStep, RunResult, make_stream_space, new_optimizer, print_generation_row,
)
from evo.metrics import RunMetrics
from evo.optim import restore_optimizer
from evo.pool import EvaluatorPool, Interrupted
from evo.signals import StopSignals
from evo.sources import Sources
from evo.steady_state import evolve
from evo.space import Recipe
from evo.store import RunStore

log = logging.getLogger(__name__)

STREAM_STATE = "stream.json"


class ContinualLoop:
    """One stream run: the optimizer, the stream, the evaluator pool and where the loop is."""

    def __init__(self, cfg: ExperimentConfig, store: RunStore, *, quiet: bool = False):
        from evo.sources import load_tokenizer, train_blocks

        self.cfg, self.store, self.quiet = cfg, store, quiet
        self.space = make_stream_space(cfg)
        self.objective_names = [o.name for o in cfg.objectives]
        tokenizer = load_tokenizer(cfg)
        st = cfg.stream
        self.stream = DataStream(st.folder, tokenizer, seq_len=cfg.eval.seq_len, heldout_frac=st.heldout_frac,
                                 replay_blocks=st.replay_blocks, seed=cfg.seed, min_chars=st.min_chars,
                                 near_dup_threshold=st.near_dup_threshold, order=st.order,
                                 state_path=store.root / STREAM_STATE, replay_train_blocks=st.replay_train_blocks)
        self.sources = Sources.load(cfg, tokenizer)
        # the zoo's own training text is the oldest rehearsal stratum (never evaluation text)
        self.rehearses = st.train_replay > 0 or "lora.rehearsal" in self.space.spec.genes
        prior_train = train_blocks(cfg, tokenizer) if cfg.eval.train_sets and self.rehearses else None
        self.prior_train = None if prior_train is None else _sample(
            prior_train, st.replay_train_blocks, np.random.default_rng([cfg.seed, 7]))
        # the static evaluation sets are the oldest data: they feed the replay sample
        self.prior = [b for b in self.sources.eval_sets.get("valid", {}).values() if len(b)]
        self.sources.eval_sets = {"valid": {}}
        self.sources.deltas[RELEASE] = {k: np.zeros_like(v) for k, v in self.sources.base.items()}
        ckpt = store.load_checkpoint()
        if ckpt is None:
            self.optimizer = new_optimizer(cfg, self.space)
            self.steady: dict | None = None  # evo.steady_state's part of the checkpoint
            self.logbook: list[dict] = []
            self.state = {"version": None, "shard": None, "phase": "done", "gen_in_version": 0,
                          "release": None, "release_dir": None, "reference": None, "history": []}
        else:
            self.optimizer = restore_optimizer(ckpt.optimizer)
            self.steady = ckpt.steady_state
            self.logbook = ckpt.logbook
            self.state = ckpt.stream
        self.cache = store.cache_load()
        self.step = None
        self.data_key = None
        self.blocks: dict[str, np.ndarray] = {}
        self.train: np.ndarray | None = None

    # ------------------------------------------------------------------------------ driver
    def run(self, *, follow: bool = False):
        cfg, st = self.cfg, self.state
        stopped = False
        with EvaluatorPool(cfg, self.sources, run_name=self.store.root.name, quiet=self.quiet) as pool, \
                StopSignals() as stop:
            self.pool, self.stop = pool, stop
            if not self.quiet and pool.dashboard_url:
                print(f"Ray dashboard: {pool.dashboard_url}  (token auth: see README)")
            self.store.event("ray_started", dashboard=pool.dashboard_url, evaluators=pool.size, stream=cfg.stream.folder)
            self.metrics = RunMetrics(self.store.root.name, self.objective_names)
            installed = None
            try:
                while not stop.requested():
                    if st["phase"] == "done":
                        if cfg.stream.max_versions is not None and len(st["history"]) >= cfg.stream.max_versions:
                            break
                        if not self._next_version():
                            if not follow or stop.sleep(cfg.stream.poll_s):
                                break
                            continue
                    if installed != (st["version"], st["release"]):
                        if not self._install():
                            continue  # a version too small to evaluate: recorded and skipped
                        installed = (st["version"], st["release"])
                        self.step = GenerationStep(cfg, self.space, self.optimizer, pool, self.store, self.cache,
                                                   self.metrics, data_key=self.data_key, set_names=list(self.blocks),
                                                   task_names=list(cfg.eval.tasks),
                                                   extra={"stream_version": st["version"], "release_slot": st["release"]})
                    if st["phase"] == "reevaluate":
                        self._reevaluate()
                        st["phase"] = "evolve"
                        self._checkpoint()
                    if st["phase"] == "evolve" and st["gen_in_version"] < cfg.stream.generations:
                        self._evolve(stop)
                    if st["phase"] == "evolve":
                        st["phase"] = "release"
                        self._checkpoint()
                    if st["phase"] == "release":
                        self._release()
                        st["phase"] = "done"
                        self._checkpoint()
            except Interrupted as exc:
                stopped = True
                self.store.event("run_stopped", reason=str(exc))
            stopped = stopped or stop.requested()
            if stopped and not self.quiet:
                print(f"stopped; continue with `evo resume {self.store.root}{' --follow' if follow else ''}`")
        best = self.optimizer.best()
        self.store.event("run_paused" if stopped else "stream_idle", versions=len(st["history"]), release=st["release"])
        result = RunResult(self.store.root, self.space.decode(best.genome) if best else None,
                           best.values if best else None, self.objective_names, self.logbook, {}, pool.dashboard_url)
        result.releases = [h["release"] for h in st["history"] if h.get("released")]
        result.versions = list(st["history"])
        if stopped:
            result.outcome = "stopped"
        elif not st["history"]:
            result.outcome, result.reason = "no_data", f"no data version in {cfg.stream.folder} (no usable shard)"
        elif best is None:
            result.outcome, result.reason = "all_failed", self.store.first_failure()
        result.release_dir = st.get("release_dir")
        return result

    # ------------------------------------------------------------------------------ steps
    def _evolve(self, stop) -> None:
        """The rest of this version's ``stream.generations`` generations: steady state (each
        result told as it arrives, a generation every ``population`` results) or synchronous."""
        st, cfg = self.state, self.cfg
        header = [True]

        def generation_done(row: dict, steady: dict | None) -> None:
            row["data_version"] = st["version"]
            self.logbook.append(row)
            st["gen_in_version"] += 1
            self.steady = steady
            self._checkpoint()
            self.store.event("generation_done", **row)
            self.metrics.generation_done(row, st["version"])
            if not self.quiet:
                print_generation_row(row, self.objective_names, header=header[0])
            header[0] = False

        end = self.optimizer.generation + cfg.stream.generations - st["gen_in_version"]
        if not evolve(self.step, end=end, on_generation=generation_done, steady_state=self.steady,
                      should_stop=stop.requested):
            raise Interrupted("stop requested between generations")

    def _next_version(self) -> bool:
        """Take the next data version (consuming at most one new one); False when none."""
        st = self.state
        known = self.stream.versions
        if known and known[-1] != st["version"] and (st["version"] is None or st["version"] in known):
            pending = known[-1]  # consumed by a driver that died before checkpointing it
        else:
            for report in self.stream.poll(max_versions=1):
                self.store.event("shard", **report.to_dict())
                if not self.quiet:
                    if report.skipped:
                        print(f"shard {report.shard}: skipped ({report.skipped})")
                    else:
                        print(f"shard {report.shard}: {report.kept}/{report.docs} documents kept "
                              f"({report.duplicates} duplicates, {report.near_duplicates} near duplicates, "
                              f"{sum(report.rejected.values())} rejected), {report.tokens} tokens -> version {report.version}")
            known = self.stream.versions
            if not known or known[-1] == st["version"]:
                return False
            pending = known[-1]
        shard = next((s["name"] for s in self.stream.state()["shards"] if s["version"] == pending), None)
        st.update(version=pending, shard=shard, phase="reevaluate", gen_in_version=0, reference=None)
        self._checkpoint()
        return True

    def _install(self) -> bool:
        """Ship the version's evaluation and training blocks and the release's weights."""
        cfg, st = self.cfg, self.state
        window = self.stream.window()
        if window.version != st["version"]:
            raise EvoError(f"{self.store.root / STREAM_STATE}: stream is at version {window.version}, "
                           f"the checkpoint at {st['version']}; the stream state and checkpoint disagree")
        rng = np.random.default_rng([cfg.seed, int(window.version.rsplit("-", 1)[-1], 16)])
        if len(window.heldout) == 0 or len(window.train) == 0:
            msg = (f"version {window.version}: {len(window.train)} train and {len(window.heldout)} held-out blocks "
                   f"of {cfg.eval.seq_len} tokens; too small to adapt and evaluate, skipped")
            log.warning(msg)
            if not self.quiet:
                print(msg)
            st["history"].append({"version": st["version"], "shard": st["shard"], "released": False,
                                  "release": st["release"], "decision": "skipped: too small"})
            st["phase"] = "done"
            self._checkpoint()
            return False
        newest = _sample(window.heldout, cfg.eval.max_blocks, rng)
        # stratified: every older version and the static sets (as one stratum) get an equal share,
        # measured as sets of their own ("replay:<stratum>"): the "replay" objective is their mean,
        # and the release rule guards each one, so no older version may quietly pay for another
        strata = {"prior": np.concatenate(self.prior)} if self.prior else {}
        strata.update({v: b for v in window.versions[:-1] if len(b := self.stream.heldout(v))})
        share = max(1, cfg.stream.replay_blocks // max(1, len(strata)))
        replay = {f"replay:{k}": _sample(b, share, rng) for k, b in strata.items()} or {"replay:newest": newest}
        train, rehearsal = self._training_blocks(window, rng)
        delta = self._release_delta()
        self.blocks = {"newest": newest, **replay}
        self.pool.update(eval_sets={"valid": self.blocks}, train=train, deltas={RELEASE: delta})
        self.train = train
        self.data_key = f"{window.version}@{st['release'] or 'base'}"
        self.window = window
        n_replay = sum(len(b) for b in replay.values())
        self.store.event("version_installed", version=window.version, shard=st["shard"], release=st["release"],
                         newest_blocks=len(newest), replay_blocks=n_replay, replay_strata=list(replay),
                         train_blocks=len(train), rehearsal_blocks=rehearsal)
        if not self.quiet:
            print(f"\ndata version {window.version} (shard {st['shard']}): {len(newest)} held-out, "
                  f"{n_replay} replay ({len(replay)} strata) and {len(train)} training blocks "
                  f"(+{rehearsal} older ones to rehearse); "
                  f"release slot: {st['release'] or 'base'}")
        return True

    def _training_blocks(self, window, rng):
        """The newest training split, plus older blocks to rehearse: an equal number from each
        older version's training split and the zoo's training text (never held-out text).

        Each LoRA batch draws a share of its blocks from the rehearsal pool: the recipe's
        ``lora.rehearsal`` gene where the search space has one, else ``stream.train_replay``.
        """
        from evo.lora import TrainingData

        cfg = self.cfg
        newest = _sample(window.train, cfg.eval.train_blocks, rng)
        older = [b for b in (self.stream.train_sample(v) for v in window.versions[:-1]) if len(b)]
        if self.prior_train is not None and len(self.prior_train):
            older.append(self.prior_train)
        if not older or not self.rehearses:
            return TrainingData(newest, None, cfg.stream.train_replay), 0
        each = cfg.stream.replay_train_blocks
        rehearsal = np.concatenate([_resample(b, each, rng) for b in older])
        return TrainingData(newest, rehearsal, cfg.stream.train_replay), len(rehearsal)

    def _release_delta(self) -> dict[str, np.ndarray]:
        base = self.sources.base
        if not self.state["release_dir"]:
            return {k: np.zeros_like(v) for k, v in base.items()}
        from evo.merge import load_model_dir

        weights, _ = load_model_dir(self.state["release_dir"])
        missing = [k for k in base if k not in weights]
        if missing:
            raise EvoError(f"{self.state['release_dir']}: tensor {missing[0]} is missing (present in the base)")
        import torch

        from evo.evaluator import DTYPES, float32_array, to_numpy

        # δ in float32 against the stored base, rounded once into the sources' dtype
        store = DTYPES[self.cfg.dtype]
        return to_numpy({k: (weights[k].float() - torch.from_numpy(float32_array(v))).to(store) for k, v in base.items()})

    def reference_recipe(self) -> Recipe:
        """The current release exactly (the base before the first release), no LoRA."""
        from evo.selection import weights_recipe

        return weights_recipe(self.cfg, {RELEASE: 1.0})

    def _reevaluate(self) -> None:
        st, step = self.state, self.step
        tag = f"v{len(st['history']):04d}"
        remembered = self.optimizer.remembered()
        named = {f"{tag}-reference": self.reference_recipe()}
        genomes = {}
        for i, e in enumerate(remembered):
            try:
                named[f"{tag}-r{i:03d}"] = self.space.decode(e.genome)
                genomes[f"{tag}-r{i:03d}"] = e
            except EvoError:
                continue
        keys, fresh = step.evaluate(named, desc=f"re-evaluation ({st['version']})", should_stop=self.stop.requested)
        rescored = {}
        for name, key in keys.items():
            result = self.cache[key]
            values = step.values(result)
            old = genomes.get(name)
            if old is not None:
                rescored[tuple(map(float, old.genome))] = values
            self.store.record_candidate({
                "generation": self.optimizer.generation, "candidate": name, "parents": [old.id] if old and old.id else [],
                "key": key, "cached": key not in fresh, "status": result["status"], "error": result.get("error"),
                "values": values, "previous_values": old.values if old else None, "metrics": result.get("metrics"),
                "recipe": named[name].to_dict(), "genome": list(map(float, old.genome)) if old else None,
                "data_version": self.data_key, "stream_version": st["version"], "release_slot": st["release"],
                "reevaluated": True, "reference": old is None,
            })
        self.optimizer.rescore(rescored)
        ref = self.cache[keys[f"{tag}-reference"]]
        st["reference"] = {"key": keys[f"{tag}-reference"], "values": step.values(ref)}
        seeds = []
        if st["release"]:  # "release + LoRA on the newest data": the sequential fine-tune, as a candidate
            release_only = {"per_model": {RELEASE: {"weight": 1.0}}, "weight": 0.0, "density": 1.0}
            shipped = self._shipped_lora()
            if shipped:  # warm start: the LoRA genes that made the current release
                seeds.append(self.space.uniform_genome(**release_only, **shipped))
            seeds.append(self.space.uniform_genome(**release_only))
        best = self.optimizer.best()
        if best is not None and best.values is not None:
            seeds.append(np.asarray(best.genome))
        self.optimizer.inject(seeds)
        self.store.event("reevaluated", version=st["version"], candidates=len(rescored),
                         reference=st["reference"]["values"], release=st["release"])
        if not self.quiet and st["reference"]["values"]:
            what = st["release"] or "base"
            vals = ", ".join(f"{n}={v:.4f}" for n, v in zip(self.objective_names, st["reference"]["values"]))
            print(f"re-evaluated {len(rescored)} remembered candidates; {what} on this version: {vals}")

    def _shipped_lora(self) -> dict:
        """``lora.*`` gene values of the candidate the current release was made from."""
        name = next((h.get("candidate") for h in reversed(self.state["history"]) if h.get("released")), None)
        if name is None:
            return {}
        recipe = next((c["recipe"] for c in reversed(self.store.candidates())
                       if c["candidate"] == name and c.get("recipe")), {})
        genes = self.space.spec.genes
        return {f"lora.{k}": v for k, v in (recipe.get("lora") or {}).items() if f"lora.{k}" in genes and v is not None}

    def _release(self) -> None:
        """Apply the release rule to every candidate evaluated on this version; export if met."""
        from evo.release_rule import decide

        cfg, st = self.cfg, self.state
        ref = (st.get("reference") or {}).get("values")
        ref_metrics = self.cache[st["reference"]["key"]].get("metrics", {}) if st.get("reference") else {}
        candidates = [c for c in self.store.candidates()
                      if c.get("data_version") == self.data_key and c.get("status") == "ok" and c.get("values")
                      and not c.get("reference")]
        anchored = cfg.release.guard == "anchored"
        d = decide(cfg, candidates, ref, ref_metrics, first=not st["release"], drift=st.get("drift"))
        entry = {"version": st["version"], "shard": st["shard"], "released": False, "release": st["release"],
                 "reference": ref, "rule": d.rule, "decision": d.decision}
        if d.candidate is not None:
            entry["candidate"] = d.candidate["candidate"]
        if d.release:
            out = self._export(d.candidate, d.rule, d.drift if anchored else None)
            entry.update(released=True, release=out.name, values=d.candidate["values"], decision=f"released {out.name}")
            st["release"], st["release_dir"] = out.name, str(out)
            if anchored:
                st["drift"] = entry["drift"] = d.drift
        st["history"].append(entry)
        self.store.event("release" if entry["released"] else "release_skipped", **entry)
        if not self.quiet:
            print(f"version {st['version']}: {entry['decision']}")

    def _export(self, cand: dict, rule: str, drift: dict | None) -> Path:
        from evo.release import eval_record, lineage_record, next_release_dir, write_release

        cfg, st = self.cfg, self.state
        recipe = Recipe.from_dict(cand["recipe"], source=f"candidate {cand['candidate']}")
        paths = model_dirs(cfg.models)
        paths[RELEASE] = st["release_dir"] or paths["base"]
        out = next_release_dir(self.store)
        specs = [o.__dict__ for o in cfg.objectives]
        fitness = {
            "objectives": {o["name"]: {"value": v, "goal": o["goal"]} for o, v in zip(specs, cand["values"])},
            "data_version": self.data_key,
            "generation": cand["generation"],
            "run": str(self.store.root.resolve()),
            "eval": {**eval_record(cfg), "sets": {}},  # the stream's blocks: eval_blocks below
            "objective_specs": specs,
            "stream": {"folder": cfg.stream.folder, "version": st["version"], "shard": st["shard"],
                       "versions": list(self.window.versions), "parent_release": st["release"], "rule": rule,
                       # retention lost since each guarded version's anchor (nats; negative: gained)
                       "retention_drift": drift},
            "current_release_same_data": {
                "name": st["release"] or "base",
                "objectives": dict(zip(self.objective_names, st["reference"]["values"] or [])),
            },
            "comparison_sets": list(self.blocks),
            "comparison": {
                f"current release ({st['release'] or 'base'})": {"valid": self.cache[st["reference"]["key"]].get("metrics", {})},
                "this release": {"valid": cand["metrics"]},
            },
            "lineage": lineage_record(self.store, cand["candidate"]),
        }
        t0 = time.time()
        out = write_release(self.store, cfg, recipe, paths, fitness, out=out, lora="merged", train=self.train,
                            eval_blocks=self.blocks)
        self.store.event("exported", release=str(out), recipe_key=recipe.key(), values=cand["values"],
                         seconds=round(time.time() - t0, 2), version=st["version"])
        return out

    def _checkpoint(self) -> None:
        self.store.save_checkpoint(Checkpoint.of(self.cfg, self.optimizer, self.logbook, self.space, self.data_key or "",
                                                 stream=self.state, pid=os.getpid(), steady_state=self.steady))


def _sample(blocks: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``k`` blocks, a seeded sample in their original order."""
    if len(blocks) <= k:
        return blocks
    return blocks[np.sort(rng.choice(len(blocks), size=k, replace=False))]


def _resample(blocks: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``k`` blocks: a seeded sample, repeating blocks only when there are fewer than ``k``
    (so every rehearsal stratum weighs the same in a batch, however small it is)."""
    if len(blocks) >= k:
        return _sample(blocks, k, rng)
    extra = blocks[rng.choice(len(blocks), size=k - len(blocks), replace=True)]
    return np.concatenate([blocks, extra])


def run_stream(cfg: ExperimentConfig, store: RunStore, *, quiet: bool = False, follow: bool = False):
    return ContinualLoop(cfg, store, quiet=quiet).run(follow=follow)
