"""The experiment config checked field against field, one section at a time.

Each check raises one ``EvoError`` line naming the config file and the field. The sections run
in a fixed order, so a config with several mistakes always reports the same first one. Takes the
config object (``evo.core.config.ExperimentConfig``) without importing it: the schema calls in.
"""
from __future__ import annotations

from pathlib import Path

from evo.core.errors import EvoError
from evo.core.paths import is_gguf_spec, resolve_gguf
from evo.core.tensors import DTYPE_NAMES

METRICS = ("logppl", "task")            # objectives[].metric
STARTS = ("uniform", "best_lambda")     # optimizer.start
STREAM_SETS = ("newest", "replay")      # a stream run's evaluation sets


def validate(cfg) -> None:
    """Every section of ``cfg``, in order."""
    _check_files(cfg)
    _check_objectives(cfg)
    _check_optimizer(cfg)
    _check_ray(cfg)
    _check_subsets(cfg)
    _check_stream(cfg)
    _check_blocks(cfg)
    _check_selection(cfg)


def _check_files(cfg) -> None:
    """The search space, models, evaluation sets and tasks exist (a GGUF entry is found, not converted)."""
    where = cfg.source
    if not cfg.search_space:
        raise EvoError(f"{where}: search_space: missing field")
    if not Path(cfg.search_space).is_file():
        raise EvoError(f"{where}: search_space: file not found: {cfg.search_space}")
    if not cfg.models.base and cfg.zoo:
        raise EvoError(f"{where}: zoo: {cfg.zoo} was not read (load the config with evo.load_config, "
                       "which fills the zoo's models and sets)")
    if not cfg.models.base:
        raise EvoError(f"{where}: models.base: missing field (or give 'zoo')")
    if not cfg.models.sources:
        raise EvoError(f"{where}: models.sources: no source models to merge")
    if not cfg.eval.sets and not cfg.streaming:
        raise EvoError(f"{where}: eval.sets: no evaluation sets (or follow a data stream: stream.folder)")
    for name, path in {"base": cfg.models.base, **cfg.models.sources}.items():
        field_name = f"models.{'sources.' + name if name != 'base' else 'base'}"
        if is_gguf_spec(path):  # converted where the sources load; here only found
            try:
                resolve_gguf(path)
            except EvoError as exc:
                raise EvoError(f"{where}: {field_name}: {exc}") from None
        elif not Path(path).is_dir():
            raise EvoError(f"{where}: {field_name}: model directory not found: {path}")
    for name, path in cfg.eval.sets.items():
        if not Path(path).is_file():
            raise EvoError(f"{where}: eval.sets.{name}: file not found: {path}")
    for name, path in cfg.eval.tasks.items():
        if not Path(path).is_file():
            raise EvoError(f"{where}: eval.tasks.{name}: file not found: {path}")


def _check_objectives(cfg) -> None:
    """Objectives: unique names, known metrics, goals and reductions, sets that exist."""
    where = cfg.source
    if not cfg.objectives:
        raise EvoError(f"{where}: objectives: at least one objective is needed")
    names = set()
    for i, obj in enumerate(cfg.objectives):
        at = f"{where}: objectives[{i}]"
        if obj.name in names:
            raise EvoError(f"{at}.name: duplicate objective {obj.name!r}")
        names.add(obj.name)
        if obj.metric not in METRICS:
            raise EvoError(f"{at}.metric: unknown metric {obj.metric!r} (known: {', '.join(METRICS)})")
        if obj.goal not in ("minimize", "maximize"):
            raise EvoError(f"{at}.goal: must be 'minimize' or 'maximize', got {obj.goal!r}")
        if obj.reduce not in ("mean", "max", "sum"):
            raise EvoError(f"{at}.reduce: must be mean, max or sum, got {obj.reduce!r}")
        known = (STREAM_SETS if cfg.streaming else cfg.eval.sets) if obj.metric == "logppl" else cfg.eval.tasks
        if obj.metric == "task" and not known:
            raise EvoError(f"{at}.metric: 'task' needs eval.tasks")
        for s in obj.sets or []:
            if s not in known:
                raise EvoError(f"{at}.sets: unknown {'evaluation set' if obj.metric == 'logppl' else 'task'} {s!r} (known: {', '.join(known)})")


def _check_optimizer(cfg) -> None:
    """Optimizer start, dtype, generations and population."""
    where = cfg.source
    if cfg.optimizer.start not in STARTS:
        raise EvoError(f"{where}: optimizer.start: must be {' or '.join(STARTS)}, got {cfg.optimizer.start!r}")
    if cfg.dtype not in DTYPE_NAMES:
        raise EvoError(f"{where}: dtype: must be auto or one of {', '.join(DTYPE_NAMES)}, got {cfg.dtype!r}")
    for key in ("generations", "population"):
        if getattr(cfg.optimizer, key) < 1:
            raise EvoError(f"{where}: optimizer.{key}: must be >= 1")


def _check_ray(cfg) -> None:
    """Evaluators, their resources and Ray's timeouts."""
    where = cfg.source
    if cfg.ray.evaluators < 1:
        raise EvoError(f"{where}: ray.evaluators: must be >= 1")
    if cfg.ray.cpus_per_evaluator < 0 or cfg.ray.gpus_per_evaluator < 0:
        raise EvoError(f"{where}: ray.cpus_per_evaluator and ray.gpus_per_evaluator: must be >= 0")
    if cfg.ray.node_memory_gb is not None and not cfg.ray.node_memory_gb > 0:
        raise EvoError(f"{where}: ray.node_memory_gb must be > 0 (or left out: the node's free memory)")
    if cfg.ray.restart_timeout_s <= 0:
        raise EvoError(f"{where}: ray.restart_timeout_s must be > 0, got {cfg.ray.restart_timeout_s}")
    if cfg.ray.connect_timeout_s <= 0 or cfg.ray.resources_timeout_s < 0:
        raise EvoError(f"{where}: ray.connect_timeout_s must be > 0 and ray.resources_timeout_s >= 0")
    if cfg.ray.threads_per_evaluator < 1:
        raise EvoError(f"{where}: ray.threads_per_evaluator: must be >= 1")


def _check_subsets(cfg) -> None:
    """The cheaper-fitness subsets of blocks and task items."""
    where = cfg.source
    if not 0.0 < cfg.eval.subset <= 1.0:
        raise EvoError(f"{where}: eval.subset: a fraction in (0, 1], got {cfg.eval.subset}")
    if cfg.eval.task_subset is not None and (isinstance(cfg.eval.task_subset, bool)
                                              or not isinstance(cfg.eval.task_subset, int)
                                              or cfg.eval.task_subset < 1):
        raise EvoError(f"{where}: eval.task_subset: a number of items >= 1, got {cfg.eval.task_subset!r}")


def _check_stream(cfg) -> None:
    """The release rule, and a stream run's settings (only when it follows a folder)."""
    where, st, rel = cfg.source, cfg.stream, cfg.release
    names = [o.name for o in cfg.objectives]
    for key in ("objective", "retention"):
        value = getattr(rel, key)
        if value is not None and value not in names:
            raise EvoError(f"{where}: release.{key}: unknown objective {value!r} (declared: {', '.join(names)})")
    if rel.lora not in ("merged", "adapter"):
        raise EvoError(f"{where}: release.lora: must be 'merged' or 'adapter', got {rel.lora!r}")
    if rel.tolerance < 0:
        raise EvoError(f"{where}: release.tolerance: must be >= 0")
    if rel.first not in ("guarded", "weighted"):
        raise EvoError(f"{where}: release.first: must be 'guarded' or 'weighted', got {rel.first!r}")
    if rel.guard not in ("anchored", "current"):
        raise EvoError(f"{where}: release.guard: must be 'anchored' or 'current', got {rel.guard!r}")
    if not cfg.streaming:
        return
    if rel.lora != "merged":
        raise EvoError(f"{where}: release.lora: a stream run merges LoRA into its releases (the next version "
                       "builds on the release's weights); use 'merged'")
    if st.generations < 1:
        raise EvoError(f"{where}: stream.generations: must be >= 1")
    if not 0.0 < st.heldout_frac < 1.0:
        raise EvoError(f"{where}: stream.heldout_frac: must be in (0, 1), got {st.heldout_frac}")
    if not 0.0 < st.near_dup_threshold <= 1.0:
        raise EvoError(f"{where}: stream.near_dup_threshold: must be in (0, 1], got {st.near_dup_threshold}")
    if st.order not in ("name", "mtime"):
        raise EvoError(f"{where}: stream.order: must be 'name' or 'mtime', got {st.order!r}")
    if st.replay_blocks < 1 or st.poll_s <= 0:
        raise EvoError(f"{where}: stream: replay_blocks >= 1 and poll_s > 0 are required")
    if not 0.0 <= st.train_replay < 1.0:
        raise EvoError(f"{where}: stream.train_replay: a share in [0, 1), got {st.train_replay}")
    if st.prior not in ("joint", "per_set"):
        raise EvoError(f"{where}: stream.prior: must be 'joint' or 'per_set', got {st.prior!r}")
    if st.max_versions is not None and st.max_versions < 1:
        raise EvoError(f"{where}: stream.max_versions: must be >= 1")
    if "release" in cfg.models.sources:
        raise EvoError(f"{where}: models.sources.release: the name 'release' is reserved for the current release in a stream run")
    if not Path(st.folder).is_dir():
        raise EvoError(f"{where}: stream.folder: folder not found: {st.folder}")


def _check_blocks(cfg) -> None:
    """Block sizes and counts."""
    where = cfg.source
    if cfg.eval.seq_len < 2 or cfg.eval.max_blocks < 1 or cfg.eval.batch_size < 1:
        raise EvoError(f"{where}: eval: seq_len >= 2, max_blocks >= 1 and batch_size >= 1 are required")
    if cfg.eval.pool_blocks is not None and cfg.eval.pool_blocks < cfg.eval.max_blocks:
        raise EvoError(f"{where}: eval.pool_blocks: must be >= eval.max_blocks ({cfg.eval.max_blocks}), "
                       f"got {cfg.eval.pool_blocks}")
    if cfg.eval.test_blocks < 1:
        raise EvoError(f"{where}: eval.test_blocks: must be >= 1")


def _check_selection(cfg) -> None:
    """The selection stage: its split, candidates, racing and λ sweep."""
    where = cfg.source
    sel = cfg.eval.selection
    if not 0.0 <= sel.fraction < 1.0:
        raise EvoError(f"{where}: eval.selection.fraction: a share of documents in [0, 1), got {sel.fraction}")
    if sel.blocks < 1 or sel.top_k < 1:
        raise EvoError(f"{where}: eval.selection: blocks >= 1 and top_k >= 1 are required")
    if sel.racing_rounds < 1:
        raise EvoError(f"{where}: eval.selection.racing_rounds: a number of rounds >= 1, got {sel.racing_rounds}")
    if any(not 0.0 < lam <= 2.0 for lam in sel.lambdas):
        raise EvoError(f"{where}: eval.selection.lambdas: task-arithmetic scales in (0, 2], got {sel.lambdas}")
    for name, path in sel.sets.items():
        if name not in cfg.eval.sets:
            raise EvoError(f"{where}: eval.selection.sets.{name}: no evaluation set of that name "
                           f"(known: {', '.join(cfg.eval.sets)})")
        if not Path(path).is_file():
            raise EvoError(f"{where}: eval.selection.sets.{name}: file not found: {path}")
    if sel.sets and set(sel.sets) != set(cfg.eval.sets):
        missing = sorted(set(cfg.eval.sets) - set(sel.sets))
        raise EvoError(f"{where}: eval.selection.sets: give a selection file for every evaluation set "
                       f"(missing: {', '.join(missing)}), or none to split them by document hash")
