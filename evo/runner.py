"""The fixed-data loop: generations of ``evo.generation.GenerationStep`` with a checkpoint after
each, then the selection stage (``evo.selection``) that picks the release.

Resume replays exactly: the optimizer state (with its RNG states) is checkpointed after each
complete generation, and every result of a half-finished generation is already in the fitness
cache, so it is not evaluated again. A config with ``stream.folder`` runs the continual loop
(``evo.continual``) instead.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from evo.checkpoint import Checkpoint
from evo.config import ExperimentConfig
from evo.errors import EvoError
from evo.generation import (  # noqa: F401  (re-exported: the loop's public names)
    GenerationStep, RunResult, initial_genomes, make_space, new_optimizer, objective_directions,
    optimizer_options, print_generation_row, search_draws,
)
from evo.metrics import RunMetrics
from evo.optim import restore_optimizer
from evo.pool import EvaluatorPool, Interrupted, Sources
from evo.selection import Selection, baseline_recipes, print_selection, weights_recipe  # noqa: F401
from evo.signals import StopSignals
from evo.space import Recipe
from evo.steady_state import evolve
from evo.store import RunStore


def _as_config(config) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        return ExperimentConfig.from_dict(config)
    return ExperimentConfig.from_yaml(config)


def run(config, run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None,
        follow: bool = False) -> RunResult:
    """Start a new run in ``run_dir`` (which must not exist or be empty).

    ``stop_after``: stop (cleanly, checkpointed) after this many generations of this call,
    as if the driver had been stopped; ``resume`` continues it. A config with ``stream.folder``
    runs the continual loop (``evo.continual``) over the shards present; ``follow=True`` keeps
    it waiting for new shards until SIGINT/SIGTERM (or ``stream.max_versions``).
    """
    cfg = _as_config(config)
    _check_follow(cfg, follow)
    if not cfg.streaming:
        _preflight(cfg)
    store = RunStore.create(run_dir, cfg.to_dict())
    try:
        store.event("run_started", name=cfg.name, pid=os.getpid(), follow=follow)
        return _dispatch(cfg, store, quiet=quiet, stop_after=stop_after, follow=follow)
    except BaseException:
        # a start that failed before any work leaves no run directory behind for a rerun to
        # refuse; once a candidate is cached or a generation checkpointed, `evo resume` continues
        store.discard_if_unstarted()
        raise


def _preflight(cfg: ExperimentConfig) -> None:
    """Fail on what the config alone can show (search space, optimizer options) before the run
    directory exists."""
    try:
        new_optimizer(cfg, make_space(cfg))
    except EvoError as exc:
        raise EvoError(f"{cfg.source}: {exc}") from None


def resume(run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None, follow: bool = False) -> RunResult:
    """Continue a stopped or killed run from its last complete generation (or loop step)."""
    store = RunStore.open(run_dir)
    cfg = ExperimentConfig.from_dict(store.config(), source=str(store.root / RunStore.CONFIG))
    _check_follow(cfg, follow)
    store.event("run_resumed", pid=os.getpid(), follow=follow)
    return _dispatch(cfg, store, quiet=quiet, stop_after=stop_after, follow=follow)


def _check_follow(cfg: ExperimentConfig, follow: bool) -> None:
    if follow and not cfg.streaming:
        raise EvoError(f"{cfg.source}: --follow needs a data stream to follow: set stream.folder")


def _dispatch(cfg, store, *, quiet, stop_after, follow) -> RunResult:
    if cfg.streaming:
        if stop_after is not None:
            raise EvoError("stop_after applies to fixed-data runs; a stream run stops with stream.max_versions or a signal")
        from evo.continual import run_stream

        return run_stream(cfg, store, quiet=quiet, follow=follow)
    return _loop(cfg, store, quiet=quiet, stop_after=stop_after)


def _loop(cfg: ExperimentConfig, store: RunStore, *, quiet: bool, stop_after: int | None) -> RunResult:
    space = make_space(cfg)
    ckpt = store.load_checkpoint()
    if ckpt is None:
        optimizer = new_optimizer(cfg, space)
        logbook: list[dict] = []
    else:
        optimizer = restore_optimizer(ckpt.optimizer)
        logbook = ckpt.logbook
    start = optimizer.generation
    done = start >= cfg.optimizer.generations
    cache = store.cache_load()
    objective_names = [o.name for o in cfg.objectives]
    set_names = list(cfg.eval.sets)
    task_names = list(cfg.eval.tasks)

    comparison: dict = {}
    selection: dict | None = None
    best = optimizer.best()
    # loaded once Ray is up: each task vector goes into the object store as it is made
    loader = functools.partial(Sources.load, cfg)
    with EvaluatorPool(cfg, loader, run_name=store.root.name, quiet=quiet) as pool, StopSignals() as stop:
        sources = pool.sources
        if not quiet and pool.dashboard_url:
            print(f"Ray dashboard: {pool.dashboard_url}  (token auth: see README)")
        store.event("ray_started", dashboard=pool.dashboard_url, evaluators=pool.size, data_version=sources.data_version)
        metrics = RunMetrics(store.root.name, objective_names)
        step = GenerationStep(cfg, space, optimizer, pool, store, cache, metrics, data_key=sources.data_version,
                              set_names=set_names, task_names=task_names, draws=search_draws(cfg, sources),
                              evidence=ckpt.evidence if ckpt else None, quiet=quiet)
        stopped = False

        def generation_done(row: dict, steady: dict | None) -> None:
            logbook.append(row)
            store.save_checkpoint(Checkpoint.of(cfg, optimizer, logbook, space, sources.data_version,
                                                data_inputs=sources.version_inputs, evidence=step.evidence,
                                                steady_state=steady))
            store.event("generation_done", **row)
            metrics.generation_done(row, sources.data_version)
            if not quiet:
                print_generation_row(row, objective_names, header=(len(logbook) == start + 1))

        try:
            def should_stop() -> bool:  # a signal, or stop_after generations done by this call
                done_here = optimizer.generation - start
                return stop.requested() or (stop_after is not None and done_here >= stop_after
                                            and optimizer.generation < cfg.optimizer.generations)

            stopped = not evolve(step, end=cfg.optimizer.generations, on_generation=generation_done,
                                 steady_state=ckpt.steady_state if ckpt else None, should_stop=should_stop)
        except Interrupted as exc:  # SIGINT/SIGTERM mid-generation: finished candidates are cached
            stopped = True
            store.event("run_stopped", reason=str(exc))
        best = optimizer.best()
        if not stopped and best is not None:
            done = True
            selection = select_release(cfg, pool, space, optimizer, store, quiet)
            comparison = selection["table"]
        elif stopped and not quiet:
            print(f"stopped after generation {optimizer.generation - 1}; continue with `evo resume {store.root}`")
    if done:
        store.event("run_finished", generations=cfg.optimizer.generations)
    outcome, reason = ("stopped", None) if stopped else ("finished", None)
    if not stopped and best is None:
        outcome, reason = "all_failed", store.first_failure()
    return RunResult(
        store.root,
        space.decode(best.genome) if best else None,
        best.values if best else None,
        objective_names,
        logbook,
        comparison,
        pool.dashboard_url,
        selection=selection,
        outcome=outcome,
        reason=reason,
    )


def select_release(cfg, pool, space, optimizer, store, quiet) -> dict:
    """The selection stage (``evo.selection``) on the pool; stored in the checkpoint."""
    def evaluate(named: dict[str, Recipe], collection: str) -> dict[str, dict]:
        todo = {label: (f"{collection}-{i:02d}", r) for i, (label, r) in enumerate(named.items())}
        results: dict[str, dict] = {}
        pool.evaluate(todo, lambda k, r: results.__setitem__(k, r), desc=f"{collection} split", collection=collection)
        return results

    evolved = []
    for e in optimizer.hall_of_fame:
        try:
            evolved.append((e.id or "?", space.decode(e.genome), e.values))
        except EvoError:
            continue
    stage = Selection(cfg, evaluate, has_selection=pool.sources.has_selection, has_test=pool.sources.has_report_sets)
    record = stage.run(evolved)
    ckpt = store.load_checkpoint()
    ckpt.selection, ckpt.comparison = record, record["table"]
    store.save_checkpoint(ckpt)
    store.event("selection", release=record["release"], reason=record["reason"], margins=record["margins"])
    if not quiet:
        print_selection(record, list(cfg.eval.sets))
    return record
