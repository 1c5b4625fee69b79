"""What every evaluator needs resident: base weights, task vectors, model config, eval blocks.

Loaded once in the driver and shipped once through Ray's object store as numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from evo.core.config import ExperimentConfig
from evo.data.splits import selection_split
from evo.data.text import data_version, read_texts
from evo.core.errors import EvoError
from evo.zoo.gguf import as_model_dir, model_dirs
from evo.core.tensors import to_numpy
from evo.data.tokens import token_blocks


def check_context(cfg: ExperimentConfig) -> None:
    """Refuse, in one line, an ``eval.seq_len`` longer than the base model's context
    (``max_position_embeddings``): positions past it are extrapolated (or index out of range),
    so every fitness would describe a model used outside what it was built for."""
    import json

    base = Path(cfg.models.base)
    config = base / "config.json"
    if not config.is_file():  # a GGUF base is checked once converted (evo.zoo.gguf writes config.json)
        return
    try:
        context = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return  # the loader reports a broken config.json itself, naming it
    if isinstance(context, int) and cfg.eval.seq_len > context:
        raise EvoError(f"{cfg.source}: eval.seq_len {cfg.eval.seq_len} exceeds the base model's context "
                       f"(max_position_embeddings {context} in {config}); set eval.seq_len <= {context}")


@dataclass
class Sources:
    base: dict[str, np.ndarray]
    deltas: dict[str, dict[str, np.ndarray]]
    model_config: dict
    eval_sets: dict[str, dict[str, np.ndarray]]  # collection ("valid", "test") -> set -> blocks
    data_version: str
    tasks: dict = field(default_factory=dict)  # name -> evo.scoring.tasks.Task (pre-tokenised)
    train: np.ndarray | None = None  # token blocks LoRA genes are fitted on (never the eval text)
    version_inputs: dict = field(default_factory=dict)  # files + settings behind data_version (for verify)
    task_items: dict = field(default_factory=dict)  # task -> item indices the search scores (eval.task_subset)
    difficulty: dict | None = None  # set -> mean NLL of base and sources per pool block (eval.subset < 1)

    @property
    def has_report_sets(self) -> bool:
        return "test" in self.eval_sets

    @property
    def has_selection(self) -> bool:
        return bool(self.eval_sets.get("selection"))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.base.values()) + sum(a.nbytes for d in self.deltas.values() for a in d.values())

    @classmethod
    def load(cls, cfg: ExperimentConfig, tokenizer=None, *, put=None) -> "Sources":
        """Everything evaluators need, from the config; ``tokenizer``: one already loaded by
        :func:`load_tokenizer` (loaded here otherwise).

        The base and task vectors are kept in ``cfg.dtype`` (each δ computed in float32, then
        rounded once). Models are read one at a time, so the driver's peak is the base, one
        model and the task vectors so far; ``put(arrays) -> arrays`` (the pool's: into the
        object store, returning zero-copy views) takes each task vector as it is made, so the
        driver never holds a private copy of all sources at once."""
        base, config, deltas = load_task_vectors(cfg, put=put)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        settings = dict(seq_len=cfg.eval.seq_len, max_blocks=cfg.eval.max_blocks, tokenizer=tokenizer.vocab_size)
        eval_sets: dict[str, dict[str, np.ndarray]] = {"valid": {}}
        difficulty = None
        if cfg.streaming:  # the continual loop installs its own blocks per data version
            eval_sets["valid"] = cls._blocks(cfg.eval.sets, tokenizer, cfg)
        else:
            eval_sets["valid"], selection = search_and_selection(cfg, tokenizer)
            if selection:
                eval_sets["selection"] = selection
            settings.update(pool_blocks=pool_size(cfg), redraw=cfg.eval.redraw,
                            selection={"fraction": cfg.eval.selection.fraction, "blocks": cfg.eval.selection.blocks,
                                       "files": sorted(cfg.eval.selection.sets.values())})
            if cfg.eval.subset < 1.0:
                from evo.scoring.subset import block_difficulty

                # measured once per data version; each generation's draw is stratified by it
                difficulty = block_difficulty(base, deltas, config.to_dict(), eval_sets["valid"], cfg.eval.batch_size)
                settings["subset"] = cfg.eval.subset
        report = cls._report_paths(cfg)
        if report and not cfg.streaming:
            eval_sets["test"] = cls._blocks(report, tokenizer, cfg, cfg.eval.test_blocks)
            settings["test_blocks"] = cfg.eval.test_blocks
        tasks = {}
        if cfg.eval.tasks:
            from evo.scoring.tasks import load_task

            tasks = {name: load_task(path, tokenizer, limit=cfg.eval.task_limit) for name, path in cfg.eval.tasks.items()}
            settings["task_limit"] = cfg.eval.task_limit
        task_items = {}
        if cfg.eval.task_subset and not cfg.streaming:
            task_items = {name: subset_items(len(task), cfg.eval.task_subset) for name, task in tasks.items()
                          if cfg.eval.task_subset < len(task)}
            if task_items:  # the search scores these items; selection and test score every item
                settings["task_subset"] = cfg.eval.task_subset
        # a stream run trains LoRA genes on the newest data version instead (evo.loop.versions.ShardStream)
        has_lora = _space_has_lora(cfg.search_space) and not cfg.streaming
        train = train_blocks(cfg, tokenizer) if has_lora else None
        files = [*cfg.eval.sets.values(), *cfg.eval.tasks.values(), *(cfg.eval.train_sets.values() if has_lora else []),
                 *cfg.eval.selection.sets.values(), *(report.values() if report and not cfg.streaming else [])]
        if has_lora:
            settings["train_blocks"] = cfg.eval.train_blocks
        version = data_version(files, **settings)
        version_inputs = {"files": [str(Path(f).resolve()) for f in files],
                          "settings": {k: v for k, v in settings.items() if k != "tokenizer"}}
        model_config = config.to_dict()
        return cls(base, deltas, model_config, eval_sets, version, tasks, train, version_inputs, task_items, difficulty)

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
    def _blocks(paths: dict[str, str], tokenizer, cfg, max_blocks: int | None = None) -> dict[str, np.ndarray]:
        return {name: _file_blocks(read_texts(path), tokenizer, cfg.eval.seq_len, max_blocks or cfg.eval.max_blocks, path)
                for name, path in paths.items()}


def load_task_vectors(cfg: ExperimentConfig, *, put=None):
    """(base, config, {source: task vector}) as numpy arrays in ``cfg.dtype`` (bf16 as uint16
    bits, see :func:`evo.core.tensors.to_numpy`); δ = θ − θ_base in float32, rounded once. One
    source model is in memory at a time; ``put`` (see :meth:`Sources.load`) takes each result."""
    from evo.core.tensors import DTYPES
    from evo.merge import load_model_dir
    from evo.merge.engine import task_vector

    store = DTYPES[cfg.dtype]
    put = put or (lambda arrays: arrays)
    dirs = model_dirs(cfg.models)  # GGUF entries are de-quantised here (once, cached)
    base, config = load_model_dir(dirs["base"])
    # the base as stored; each task vector is taken against it (so base + δ is the source up to
    # δ's one rounding), as `evo export` and the continual loop's release delta take theirs
    base = {n: t.to(store) if t.dtype.is_floating_point else t for n, t in base.items()}
    deltas = {}
    for name in cfg.models.sources:
        model, _ = load_model_dir(dirs[name])
        delta = task_vector(base, model, name, store, consume=True)  # the model is freed tensor by tensor
        deltas[name] = put(to_numpy(delta))
        del model, delta
    return put(to_numpy(base)), config, deltas


def _file_blocks(texts: list[str], tokenizer, seq_len: int, max_blocks: int | None, where: str) -> np.ndarray:
    try:
        return token_blocks(texts, tokenizer, seq_len, max_blocks).numpy()
    except ValueError as exc:
        raise EvoError(f"{where}: {exc}") from None


def pool_size(cfg: ExperimentConfig) -> int:
    """Blocks per set in the search pool: ``eval.pool_blocks``, by default 8 draws' worth (only
    the draw itself without ``eval.redraw``)."""
    if not cfg.eval.redraw:
        return cfg.eval.max_blocks
    return cfg.eval.pool_blocks or 8 * cfg.eval.max_blocks


def search_and_selection(cfg: ExperimentConfig, tokenizer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per evaluation set, the search pool's blocks and the selection split's blocks.

    Without ``eval.selection.sets``, each file's documents are split by content hash
    (:func:`evo.data.splits.selection_split`); a file of a single document (plain text) is split by
    position instead: its last ``fraction`` of blocks are held out for selection.
    """
    sel = cfg.eval.selection
    seq_len, pool = cfg.eval.seq_len, pool_size(cfg)
    search, selection = {}, {}
    for name, path in cfg.eval.sets.items():
        docs = read_texts(path)
        if sel.sets:
            search[name] = _file_blocks(docs, tokenizer, seq_len, pool, path)
            selection[name] = _file_blocks(read_texts(sel.sets[name]), tokenizer, seq_len, sel.blocks, sel.sets[name])
            continue
        search_docs, held_docs = selection_split(docs, sel.fraction)
        if sel.fraction > 0 and not held_docs:  # one document: split its blocks by position
            blocks = _file_blocks(docs, tokenizer, seq_len, None, path)
            k = max(1, round(sel.fraction * len(blocks)))
            if len(blocks) < 2:
                raise EvoError(f"{path}: too little text to hold out a selection split "
                               f"({len(blocks)} block of {seq_len} tokens); add text or set eval.selection.fraction: 0")
            search[name], selection[name] = blocks[: len(blocks) - k][:pool], blocks[len(blocks) - k:][: sel.blocks]
            continue
        search[name] = _file_blocks(search_docs, tokenizer, seq_len, pool, f"{path} (search documents)")
        if held_docs:
            selection[name] = _file_blocks(held_docs, tokenizer, seq_len, sel.blocks, f"{path} (selection documents)")
    return search, selection


def subset_items(n: int, k: int) -> list[int]:
    """``k`` of ``n`` item indices, evenly spaced (deterministic; task files are pre-shuffled)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(k, n))})


def _space_has_lora(path: str) -> bool:
    from evo.search.space import SearchSpaceSpec

    return any(name.startswith("lora.") for name in SearchSpaceSpec.from_yaml(path).genes)


def load_tokenizer(cfg: ExperimentConfig):
    """The run's tokenizer (``eval.tokenizer``, else the base model's); a one-line error if unreadable."""
    tok_dir = cfg.eval.tokenizer or as_model_dir(cfg.models.base)
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
