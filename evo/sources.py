"""What every evaluator needs resident: base weights, task vectors, model config, eval blocks.

Loaded once in the driver and shipped once through Ray's object store as numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from evo.config import ExperimentConfig
from evo.data import data_version, read_texts
from evo.errors import EvoError
from evo.evaluator import to_numpy
from evo.fitness import token_blocks


@dataclass
class Sources:
    base: dict[str, np.ndarray]
    deltas: dict[str, dict[str, np.ndarray]]
    model_config: dict
    eval_sets: dict[str, dict[str, np.ndarray]]  # collection ("valid", "test") -> set -> blocks
    data_version: str
    tasks: dict = field(default_factory=dict)  # name -> evo.tasks.Task (pre-tokenised)
    train: np.ndarray | None = None  # token blocks LoRA genes are fitted on (never the eval text)
    version_inputs: dict = field(default_factory=dict)  # files + settings behind data_version (for verify)
    task_items: dict = field(default_factory=dict)  # task -> item indices the search scores (eval.task_subset)

    @property
    def has_report_sets(self) -> bool:
        return "test" in self.eval_sets

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.base.values()) + sum(a.nbytes for d in self.deltas.values() for a in d.values())

    @classmethod
    def load(cls, cfg: ExperimentConfig, tokenizer=None) -> "Sources":
        """Everything evaluators need, from the config; ``tokenizer``: one already loaded by
        :func:`load_tokenizer` (loaded here otherwise)."""
        from evo.merge import load_model_dir, task_vectors

        base, config = load_model_dir(cfg.models.base)
        models = {name: load_model_dir(path)[0] for name, path in cfg.models.sources.items()}
        deltas = task_vectors(base, models)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        settings = dict(seq_len=cfg.eval.seq_len, max_blocks=cfg.eval.max_blocks, tokenizer=tokenizer.vocab_size)
        eval_sets = {"valid": cls._blocks(cfg.eval.sets, tokenizer, cfg)}
        subset = None
        if cfg.eval.subset < 1.0 and not cfg.streaming:
            from evo.subset import choose_subset

            # chosen once for this data version; the full blocks stay for the final comparison
            subset = choose_subset(to_numpy(base), {m: to_numpy(d) for m, d in deltas.items()}, config.to_dict(),
                                   eval_sets["valid"], cfg.eval.subset, cfg.eval.batch_size)
            eval_sets["full"] = eval_sets["valid"]
            eval_sets["valid"] = {n: b[subset[n]] for n, b in eval_sets["full"].items()}
            settings["subset"] = cfg.eval.subset
        report = cls._report_paths(cfg)
        if report:
            eval_sets["test"] = cls._blocks(report, tokenizer, cfg)
        tasks = {}
        if cfg.eval.tasks:
            from evo.tasks import load_task

            tasks = {name: load_task(path, tokenizer, limit=cfg.eval.task_limit) for name, path in cfg.eval.tasks.items()}
            settings["task_limit"] = cfg.eval.task_limit
        task_items = {}
        if cfg.eval.task_subset and not cfg.streaming:
            task_items = {name: subset_items(len(task), cfg.eval.task_subset) for name, task in tasks.items()
                          if cfg.eval.task_subset < len(task)}
            if task_items:
                settings["task_subset"] = cfg.eval.task_subset
                # the final comparison scores every item: it reads the "full" collection
                eval_sets.setdefault("full", eval_sets["valid"])
        # a stream run trains LoRA genes on the newest data version instead (evo.continual)
        has_lora = _space_has_lora(cfg.search_space) and not cfg.streaming
        train = train_blocks(cfg, tokenizer) if has_lora else None
        files = [*cfg.eval.sets.values(), *cfg.eval.tasks.values(), *(cfg.eval.train_sets.values() if has_lora else [])]
        if has_lora:
            settings["train_blocks"] = cfg.eval.train_blocks
        version = data_version(files, **settings)
        version_inputs = {"files": [str(Path(f).resolve()) for f in files],
                          "settings": {k: v for k, v in settings.items() if k != "tokenizer"}}
        model_config = config.to_dict()
        return cls(to_numpy(base), {m: to_numpy(d) for m, d in deltas.items()}, model_config, eval_sets, version, tasks,
                   train, version_inputs, task_items)

    @staticmethod
    def _report_paths(cfg: ExperimentConfig) -> dict[str, str]:
        """Test splits next to zoo validation files, used only for the final comparison."""
        out = {}
        for name, path in cfg.eval.sets.items():
            p = Path(path)
            test = p.with_name(p.name.replace("valid", "test"))
            if "valid" in p.name and test.is_file():
                out[name] = str(test)
        return out if len(out) == len(cfg.eval.sets) else {}

    @staticmethod
    def _blocks(paths: dict[str, str], tokenizer, cfg) -> dict[str, np.ndarray]:
        out = {}
        for name, path in paths.items():
            try:
                blocks = token_blocks(read_texts(path), tokenizer, cfg.eval.seq_len, cfg.eval.max_blocks)
            except ValueError as exc:
                raise EvoError(f"{path}: {exc}") from None
            out[name] = blocks.numpy()
        return out


def subset_items(n: int, k: int) -> list[int]:
    """``k`` of ``n`` item indices, evenly spaced (deterministic; task files are pre-shuffled)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(k, n))})


def _space_has_lora(path: str) -> bool:
    from evo.space import SearchSpaceSpec

    return any(name.startswith("lora.") for name in SearchSpaceSpec.from_yaml(path).genes)


def load_tokenizer(cfg: ExperimentConfig):
    """The run's tokenizer (``eval.tokenizer``, else the base model's); a one-line error if unreadable."""
    tok_dir = cfg.eval.tokenizer or cfg.models.base
    try:
        return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise EvoError(f"{tok_dir}: cannot load tokenizer ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def train_blocks(cfg: ExperimentConfig, tokenizer) -> np.ndarray | None:
    """The token blocks LoRA genes train on: an equal share from every training set."""
    if not cfg.eval.train_sets:
        return None
    per_set = max(1, cfg.eval.train_blocks // len(cfg.eval.train_sets))
    return np.concatenate([
        token_blocks(read_texts(p), tokenizer, cfg.eval.seq_len, per_set).numpy() for p in cfg.eval.train_sets.values()
    ])
