"""The loop: every run, fixed-data or stream, is this loop over data versions.

For each data version its source (``evo.loop.versions``) yields::

    install     ship the version's evaluation (and training) blocks to the evaluators
    reevaluate  re-measure what the optimizer remembers on the new data (versions after a first)
    evolve      generations of ``evo.loop.generation.GenerationStep``, steady state or synchronous
                (``evo.loop.steady_state.evolve``), a checkpoint after each
    release     the version's release step: the selection stage for fixed data (one version),
                the release rule for a stream (one version per shard)

A fixed-data run is this loop with one data version. Each step checkpoints the loop's ``state``
(version, phase, generations done in it, and what the version source keeps), so ``evo resume``
continues at the step it was in; every finished candidate is in the fitness cache, and the
steady-state search log replays the order results arrived in, so nothing finished is redone.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from evo.artifacts.checkpoint import Checkpoint
from evo.core.config import ExperimentConfig, config_changes
from evo.loop.experiment import load_config
from evo.core.errors import EvoError
from evo.scoring.sources import check_context
from evo.loop.generation import GenerationStep, RunResult, new_optimizer, print_generation_row
from evo.cluster.metrics import RunMetrics
from evo.search.optim import restore_optimizer
from evo.cluster.pool import EvaluatorPool, Interrupted
from evo.loop.signals import StopSignals
from evo.loop.steady_state import evolve
from evo.artifacts.lock import RunLock
from evo.artifacts.status import format_time_split, time_split
from evo.artifacts.store import RunStore
from evo.core.fs import atomic_write_text, read_yaml
from evo.loop.version_source import VersionSource
from evo.loop.versions import version_source


class Loop:
    """One run: the optimizer, the data versions, the evaluator pool and where the loop is."""

    def __init__(self, cfg: ExperimentConfig, store: RunStore, versions: VersionSource, *, quiet: bool = False,
                 evaluator_class=None):
        self.cfg, self.store, self.versions, self.quiet = cfg, store, versions, quiet
        self.evaluator_class = evaluator_class  # None: evo.scoring.evaluator.Evaluator
        self.space = versions.space
        self.objective_names = [o.name for o in cfg.objectives]
        ckpt = store.load_checkpoint()
        if ckpt is None:
            self.optimizer = new_optimizer(cfg, self.space)
            self.steady: dict | None = None  # evo.loop.steady_state's part of the checkpoint
            self.logbook: list[dict] = []
        else:
            self.optimizer = restore_optimizer(ckpt.optimizer)
            self.steady = ckpt.steady_state
            self.logbook = ckpt.logbook
        self.state = versions.open(self, ckpt)
        self.cache = store.cache_load()
        self.step: GenerationStep | None = None
        self.data_key: str | None = None
        self.pool: EvaluatorPool | None = None
        self.stop: StopSignals | None = None
        self.metrics: RunMetrics | None = None
        self.call_seconds: dict[str, float] = {}  # seconds per loop step in this call (the time split)

    def run(self, *, follow: bool = False, stop_after: int | None = None) -> RunResult:
        """Until the version source has nothing more (``follow``: wait for more until a signal),
        a signal, or ``stop_after`` generations done by this call."""
        cfg, st, versions = self.cfg, self.state, self.versions
        stopped = False
        t0 = time.time()
        if versions.reopen(st):  # a finished run resumed with more generations: search on, then select again
            self.store.event("run_reopened", gen_in_version=st["gen_in_version"], generations=versions.generations)
            if not self.quiet:
                print(f"resuming a finished run: generations {st['gen_in_version']} -> {versions.generations}, "
                      "then selection again")
        with EvaluatorPool(cfg, versions.sources, run_name=self.store.root.name, quiet=self.quiet,
                           evaluator_class=self.evaluator_class) as pool, \
                StopSignals() as stop:
            self.pool, self.stop = pool, stop
            if not self.quiet and pool.dashboard_url:
                print(f"Ray dashboard: {pool.dashboard_url}  (token auth: see docs/running.md)")
            evaluators = pool.size  # the pool holds no actors once closed, where the time split is made
            self.store.event("ray_started", dashboard=pool.dashboard_url, evaluators=evaluators, **versions.describe(pool))
            self.metrics = RunMetrics(self.store.root.name, self.objective_names)
            start = self.optimizer.generation

            def should_stop() -> bool:
                return stop.requested() or (stop_after is not None and self.optimizer.generation - start >= stop_after)

            installed = None
            try:
                while not stop.requested():
                    if st["phase"] == "done":
                        if versions.exhausted(st):
                            break
                        if not versions.next_version(self):
                            if not follow or stop.sleep(versions.poll_s):
                                break
                            continue
                    if installed != versions.install_key(st):
                        with self.timed("install"):
                            installed_now = versions.install(self)
                        if installed_now is None:
                            continue  # a version too small to evaluate: recorded and skipped
                        installed = versions.install_key(st)
                        self.data_key = installed_now.data_key
                        self.step = GenerationStep(
                            cfg, self.space, self.optimizer, pool, self.store, self.cache, self.metrics,
                            data_key=installed_now.data_key, set_names=installed_now.set_names,
                            task_names=list(cfg.eval.tasks), extra=installed_now.extra, draws=installed_now.draws,
                            evidence=installed_now.evidence, quiet=self.quiet)
                    if st["phase"] == "reevaluate":
                        with self.timed("reevaluate"):
                            versions.reevaluate(self)
                        st["phase"] = "evolve"
                        self.checkpoint()
                    if st["phase"] == "evolve" and st["gen_in_version"] < versions.generations:
                        with self.timed("start"):
                            self._start(should_stop)
                        with self.timed("evolve"):
                            self._evolve(should_stop)
                    if st["phase"] == "evolve":
                        st["phase"] = "release"
                        self.checkpoint()
                    if st["phase"] == "release":
                        with self.timed("release"):
                            versions.release(self)
                        st["phase"] = "done"
                        self.checkpoint()
            except Interrupted as exc:  # a signal or stop_after: finished candidates are cached
                stopped = True
                self.store.event("run_stopped", reason=str(exc))
            stopped = stopped or stop.requested()
            if stopped and not self.quiet:
                print(f"stopped after generation {self.optimizer.generation - 1}; continue with "
                      f"`evo resume {self.store.root}{' --follow' if follow else ''}`")
        best = self.optimizer.best()
        result = RunResult(self.store.root, self.space.decode(best.genome) if best else None,
                           best.values if best else None, self.objective_names, self.logbook, {}, pool.dashboard_url)
        if stopped:
            result.outcome = "stopped"
        # before the finish events (run_finished, run_paused, stream_idle), which stay the log's last word
        result.time = time_split(self.call_seconds, time.time() - t0,
                                 [r for r in self.cache.values() if (r.get("dispatch") or {}).get("start", 0) >= t0],
                                 cfg.eval.seq_len, evaluators, versions.release_step)
        self.store.event("time_split", **result.time)
        if not self.quiet:
            print(format_time_split(result.time))
        versions.finish(self, result, stopped)
        return result

    @contextmanager
    def timed(self, step: str):
        """Add the wall seconds of one of the version's steps to ``state["seconds"]`` (checkpointed
        with the state, so a resumed version keeps counting): where each version's time goes."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            spent = self.state.setdefault("seconds", {})
            spent[step] = round(spent.get(step, 0.0) + took, 2)
            self.call_seconds[step] = self.call_seconds.get(step, 0.0) + took  # this driver call's split

    def _start(self, should_stop) -> None:
        """Before a fresh search's first ask: start it at the best of the version source's start
        points (``optimizer.start: best_lambda``), scored on the first generation's blocks."""
        opt = self.optimizer
        if opt.generation or opt.asked or opt.pending or self.steady or not opt.starts_anywhere:
            return  # started already (a resumed run restores the optimizer it started)
        points = self.versions.start_points(self)
        if not points:
            return
        best, scores = self.step.start_point(points, should_stop=should_stop)
        opt.start_at(points[best])
        self.store.event("search_start", start=best, scores=scores)
        if not self.quiet:
            print(f"search starts at {best} (best of {len(points)} start points on generation 0's blocks)")

    def _evolve(self, should_stop) -> None:
        """The rest of this version's generations; a checkpoint at every generation boundary."""
        st = self.state
        header = [True]

        def generation_done(row: dict, steady: dict | None) -> None:
            row["data_version"] = st["version"]
            self.logbook.append(row)
            st["gen_in_version"] += 1
            self.steady = steady
            self.checkpoint()
            self.store.event("generation_done", **row)
            self.metrics.generation_done(row, st["version"])
            if not self.quiet:
                print_generation_row(row, self.objective_names, header=header[0])
            header[0] = False

        end = self.optimizer.generation + self.versions.generations - st["gen_in_version"]
        if not evolve(self.step, end=end, on_generation=generation_done, steady_state=self.steady,
                      should_stop=should_stop):
            raise Interrupted("stop requested between generations")

    def checkpoint(self) -> None:
        self.store.save_checkpoint(Checkpoint.of(self.cfg, self.optimizer, self.logbook, self.space, self.data_key or "",
                                                 pid=os.getpid(), steady_state=self.steady,
                                                 **self.versions.checkpoint_fields(self)))


def run(config, run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None,
        follow: bool = False, evaluator_class=None) -> RunResult:
    """Start a new run in ``run_dir`` (which must not exist or be empty).

    ``stop_after``: stop (cleanly, checkpointed) after this many generations of this call, as
    if the driver had been stopped; ``resume`` continues it. A config with ``stream.folder``
    follows that folder's shards; ``follow=True`` keeps waiting for new shards until
    SIGINT/SIGTERM (or ``stream.max_versions``). ``evaluator_class``: the evaluator actors' class,
    a subclass of ``evo.scoring.evaluator.Evaluator`` (benchmarks emulate a slow device with one).
    """
    cfg = load_config(config)
    versions = version_source(cfg, follow=follow)
    try:  # fail on what the config alone can show before the run directory exists
        new_optimizer(cfg, versions.space)
    except EvoError as exc:
        raise EvoError(f"{cfg.source}: {exc}") from None
    check_context(cfg)
    store = RunStore.create(run_dir, cfg.to_dict())
    lock = RunLock(store.root, "run").acquire()  # a `evo resume` of this folder is refused while it runs
    try:
        store.event("run_started", name=cfg.name, pid=os.getpid(), follow=follow)
        return Loop(cfg, store, versions, quiet=quiet, evaluator_class=evaluator_class).run(follow=follow, stop_after=stop_after)
    except BaseException:
        # a start that failed before any work leaves no run directory behind for a rerun to
        # refuse; once a candidate is cached or a generation checkpointed, `evo resume` continues
        store.discard_if_unstarted()
        raise
    finally:
        lock.release()


def accept_config_changes(store: RunStore) -> dict[str, tuple]:
    """Compare ``config.yaml`` (which the user may have edited) with the config the run was
    made with: apply the changes a resume may make (``evo.core.config.RESUMABLE``) and return
    them; refuse any other in one line naming the field."""
    import yaml

    applied_path = store.root / RunStore.APPLIED
    edited = store.config()
    if not applied_path.is_file():  # a run made before evo kept this copy: what it has is what ran
        atomic_write_text(applied_path, yaml.safe_dump(edited, sort_keys=False))
        return {}
    applied = read_yaml(applied_path, "applied run config")
    where = str(store.root / RunStore.CONFIG)
    # both through the schema, so a key written out or left to its default compares equal
    normal = lambda d, src: load_config(d, source=src).to_dict()  # noqa: E731
    changes = config_changes(normal(applied, str(applied_path)), normal(edited, where), where=where)
    if changes:
        atomic_write_text(applied_path, yaml.safe_dump(edited, sort_keys=False))
    return changes


def resume(run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None, follow: bool = False) -> RunResult:
    """Continue a stopped or killed run from the step it was in.

    ``RUN_DIR/config.yaml`` may have been edited since: the fields in
    :data:`evo.core.config.RESUMABLE` (more generations, other evaluators, the dashboard)
    apply; any other change is refused in one line naming the field.
    """
    store = RunStore.open(run_dir)
    with RunLock(store.root, "resume"):  # refused while another driver works in this folder
        changes = accept_config_changes(store)
        cfg = load_config(store.config(), source=str(store.root / RunStore.CONFIG))
        versions = version_source(cfg, follow=follow)
        check_context(cfg)
        store.event("run_resumed", pid=os.getpid(), follow=follow, config_changes=changes)
        if changes and not quiet:
            print("resume applies " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        return Loop(cfg, store, versions, quiet=quiet).run(follow=follow, stop_after=stop_after)
