"""Evaluator actors on Ray: started once per run, fed candidates as named tasks.

Each actor receives the resident sources once (object refs resolved zero-copy on the node).
Candidates run as actor tasks named ``gXXXX-cYYY`` so the dashboard shows the population. A
candidate whose worker dies is re-run (the actor is restarted by Ray) up to ``ray.retries``
times; one that times out has its actor killed and restarted; a candidate that raises is
returned as failed by the evaluator itself.

Ray itself is started in ``evo.cluster.bootstrap``; whether the cluster can host the evaluators,
and the memory plan of its largest node, is ``evo.cluster.placement``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError
from tqdm import tqdm

from evo.cluster.bootstrap import signals_held, start_ray
from evo.cluster.memory import check_plan, object_store_bytes, plan_for
from evo.cluster.placement import check_resources, cluster_plan
from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.scoring.evaluator import Evaluator
from evo.scoring.rejection import RejectionTest
from evo.scoring.sources import Sources


class Interrupted(EvoError):
    """A stop was requested (SIGINT/SIGTERM) while candidates were being evaluated."""


class EvaluatorPool:
    """A fixed set of evaluator actors and a dispatch loop that keeps each one busy."""

    def __init__(self, cfg: ExperimentConfig, sources: Sources | Callable[..., Sources], *, run_name: str = "run",
                 quiet: bool = False, evaluator_class: type[Evaluator] | None = None):
        """``sources``: loaded :class:`Sources`, or ``loader(put=...) -> Sources`` called once Ray
        is up, so each task vector goes into the object store as it is made (the driver's peak
        is then one model, not all of them)."""
        # the actors' class: Evaluator, or a subclass taking its constructor's arguments (a
        # benchmark's emulated slow device: experiments/bench_runner.py --busy). Ray pickles it for
        # the workers, so a subclass they cannot import must be one cloudpickle ships by value.
        self.evaluator_class = evaluator_class or Evaluator
        self.cfg = cfg
        self.sources = sources
        self.run_name = run_name
        self.quiet = quiet
        self.started_ray = False
        self.dashboard_url = None
        self.actors = []
        self.lost: set[int] = set()  # evaluators Ray could not restart (out of restarts)
        self.restarting: dict[int, float] = {}  # evaluators Ray is restarting -> when to give up on them
        self.plan = None  # evo.cluster.memory.MemoryPlan, made on entry
        self._refs: dict[int, ray.ObjectRef] = {}  # id(view) -> the object it views

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "EvaluatorPool":
        rc = self.cfg.ray
        external = bool(rc.address or os.environ.get("RAY_ADDRESS"))
        embedded = not external and not ray.is_initialized()  # we start Ray here, on this machine
        say = (lambda msg: None) if self.quiet else print
        object_store = None
        if embedded:  # this machine is the node: plan (and size the object store) before starting Ray
            self.plan = plan_for(self.cfg)
            say(self.plan.table())
            check_plan(self.cfg, self.plan)
            object_store = object_store_bytes(self.plan)
        self.started_ray, self.dashboard_url = start_ray(self.cfg, object_store=object_store)
        try:
            check_resources(self.cfg, wait_s=rc.resources_timeout_s if external else 0.0, say=say)
            if not embedded:  # the cluster's largest node, as Ray reports it
                self.plan = cluster_plan(self.cfg)
                say(self.plan.table())
                check_plan(self.cfg, self.plan)
            if callable(self.sources):
                self.sources = self.sources(put=self._put)
            else:  # loaded before Ray: put them now, and keep views instead of the private copy
                self.sources.deltas = {m: self._put(d) for m, d in self.sources.deltas.items()}
                self.sources.base = self._put(self.sources.base)
        except BaseException:
            if self.started_ray:
                with signals_held():
                    ray.shutdown()
            raise
        # The sources go through the object store once and reach each actor with its first
        # update(), not as constructor arguments: Ray restarts an actor by re-running its
        # constructor, and constructor arguments in the object store are not kept for that
        # (ray-project/ray#53727), so a restarted actor comes up empty, answers "stale" and is
        # sent the same update again from the references this pool holds. Each source is its
        # own object (put as it was loaded); the evaluator resolves the nested references.
        refs = {"base": self._ref(self.sources.base),
                "sources": {m: self._ref(d) for m, d in self.sources.deltas.items()},
                "eval_sets": ray.put(self.sources.eval_sets), "tasks": ray.put(self.sources.tasks),
                "train": ray.put(self.sources.train)}
        er = self.cfg.eval.early_rejection
        device = "cuda" if rc.gpus_per_evaluator > 0 else "cpu"
        actor_cls = ray.remote(self.evaluator_class)
        for i in range(rc.evaluators):
            # the driver's pid keeps names unique when a resumed driver meets a dying predecessor's actors
            name = f"evo-{self.run_name}-{os.getpid()}-evaluator-{i}"
            self.actors.append(
                actor_cls.options(
                    name=name,
                    num_cpus=rc.cpus_per_evaluator,
                    num_gpus=rc.gpus_per_evaluator,
                    max_restarts=max(rc.retries, 0) + 1,
                    max_task_retries=0,  # we retry ourselves, to count and bound retries per candidate
                ).remote(
                    None, None, self.sources.model_config,
                    threads=rc.threads_per_evaluator, device=device, batch_size=self.cfg.eval.batch_size, name=name,
                    rejection=RejectionTest.of(er),
                    task_items=self.sources.task_items, dtype=self.cfg.dtype,
                    stream_sources=bool(self.plan and self.plan.stream_sources),
                )
            )
        self.epoch = 1
        self._update_refs: dict = refs
        for actor in self.actors:  # not awaited: an actor runs its calls in order, so it loads first
            self._send_update(actor)
        return self

    def _put(self, arrays: dict) -> dict:
        """Into the object store; returns the stored object's zero-copy (read-only) views, which
        replace the caller's copy, so the driver holds no second copy of the sources."""
        ref = ray.put(arrays)
        view = ray.get(ref)
        self._refs[id(view)] = ref
        return view

    def _ref(self, view: dict) -> "ray.ObjectRef":
        ref = self._refs.get(id(view))
        return ref if ref is not None else ray.put(view)

    def update(self, *, eval_sets=None, train=None, deltas=None) -> None:
        """Ship new data to every evaluator (once through the object store) and wait for it.

        Later calls to :meth:`evaluate` carry the new epoch; an actor that Ray restarted (empty)
        answers ``stale`` and is sent the sources and every change since before it retries.
        """
        self.epoch += 1
        refs = {"eval_sets": None if eval_sets is None else ray.put(eval_sets),
                "train": None if train is None else ray.put(train),
                "deltas": None if deltas is None else ray.put(deltas)}
        # an actor restarted later needs everything since the start, not just this change
        self._update_refs = {**self._update_refs, **{k: v for k, v in refs.items() if v is not None}}
        ray.get([self._send_update(a) for a in self.actors])

    def _send_update(self, actor):
        return actor.update.remote(self.epoch, **self._update_refs)

    def __exit__(self, *exc) -> None:
        # a Ctrl-C (or SIGTERM) now would cut ray.shutdown short and orphan Ray's agents: it is
        # held until Ray is down, then honoured (KeyboardInterrupt: the CLI exits 130)
        with signals_held() as held:
            for actor in self.actors:
                try:
                    ray.kill(actor)
                except Exception:
                    pass
            self.actors = []
            if self.started_ray:
                ray.shutdown()
        if held and exc[0] is None:
            raise KeyboardInterrupt

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    @property
    def size(self) -> int:
        return len(self.actors)

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    # ------------------------------------------------------------------ dispatch
    def evaluate(self, todo: dict, on_result: Callable[[str, dict], None], *, desc: str = "", collection: str = "valid",
                 reject_above: float | None = None, should_stop: Callable[[], bool] | None = None,
                 blocks: dict[str, list[int]] | None = None) -> None:
        """Evaluate ``todo = {key: (task name, Recipe)}``, calling ``on_result(key, result)`` as each ends.

        ``should_stop``: polled about once a second; when it turns true, candidates still
        running are abandoned (their actors are killed on exit) and :class:`Interrupted` is
        raised. Results already delivered stay delivered, so nothing finished is lost.
        ``blocks``: the rows of each set of ``collection`` to score (a generation's draw).
        """
        jobs = iter([Job(key, name, recipe.to_dict(), reject_above, blocks, collection)
                     for key, (name, recipe) in todo.items()])
        self.stream(lambda: next(jobs, None), on_result, desc=desc, total=len(todo), should_stop=should_stop)

    def stream(self, feed: Callable[[], "Job | None"], on_result: Callable[[str, dict], None], *, desc: str = "",
               total: int | None = None, should_stop: Callable[[], bool] | None = None) -> None:
        """Keep every evaluator busy: whenever one is free, run the next job ``feed()`` gives
        (``None``: nothing to run now); ``on_result(key, result)`` as each ends, in the order they
        end, which may call back into whatever ``feed`` draws from. Returns once ``feed`` has
        nothing and nothing is running. Each result carries ``dispatch``: the evaluator, and the
        driver's clock when it was sent and when its result came back (busy-time accounting).
        """
        retry: list[Job] = []
        idle = [a for a in range(len(self.actors)) if a not in self.lost and a not in self.restarting]
        inflight: dict = {}  # ref -> (job, actor index, start time)
        # an actor whose worker or node died is pinged until Ray has restarted it (its ping
        # answers), so a retry goes to a live evaluator instead of queueing behind a restart that
        # may never be placed (its node gone). While Ray reports it RESTARTING (the ping raises
        # ActorUnavailableError) it is pinged again every half second, up to
        # ray.restart_timeout_s; out of restarts (ActorDiedError) it is lost for the run.
        recovering: dict = {}  # ping ref -> actor index
        next_ping = {a: 0.0 for a in self.restarting}  # actors restarting since an earlier batch: ping now
        restart_timeout = self.cfg.ray.restart_timeout_s
        timeout = self.cfg.ray.candidate_timeout_s
        failed = rejected = stale_updates = 0

        def take() -> Job | None:
            return retry.pop(0) if retry else feed()

        def restart(a: int, now: float) -> None:
            self.restarting.setdefault(a, now + restart_timeout)
            next_ping[a] = now

        def deliver(job: Job, result: dict) -> None:
            nonlocal failed, rejected
            # an early rejection is a verdict on the candidate, not a failure to evaluate it
            failed += result["status"] == "failed"
            rejected += result["status"] == "rejected"
            on_result(job.key, result)
            bar.update(1)
            bar.set_postfix(failed=failed, rejected=rejected, running=len(inflight))

        bar = tqdm(total=total, desc=desc, disable=self.quiet or total == 0, leave=False, unit="cand")
        try:
            while True:
                if should_stop is not None and should_stop():
                    raise Interrupted(f"stopped with {len(retry) + len(inflight)} candidate(s) of {desc or 'this batch'} unfinished")
                while idle:
                    job = take()
                    if job is None:
                        break
                    a = idle.pop(0)
                    ref = self.actors[a].evaluate.options(name=job.name).remote(
                        job.recipe, job.collection, job.reject_above, self.epoch, job.blocks)
                    inflight[ref] = (job, a, time.time())
                if not ray.is_initialized():
                    raise EvoError("Ray was shut down while candidates were running")
                now = time.time()
                for a in self.restarting:
                    if next_ping.get(a, 0.0) <= now:  # one ping out at a time
                        recovering[self.actors[a].pid.remote()] = a
                        next_ping[a] = float("inf")
                if not inflight:
                    if idle:
                        break  # feed has nothing and nothing runs (a restarting actor is pinged next batch)
                    job = take()
                    if job is None:
                        break
                    retry.insert(0, job)
                    if not self.restarting:
                        raise EvoError(f"every evaluator was lost ({len(self.lost)} of {len(self.actors)}); "
                                       f"candidate {job.name} of {desc or 'this batch'} could not run")
                if inflight or recovering:
                    ready, _ = ray.wait([*inflight, *recovering], num_returns=1,
                                        timeout=0.5 if self.restarting else 1.0)
                else:  # only restarting actors, none pinged now: wait for their next ping
                    ready = []
                    time.sleep(0.2)
                now = time.time()
                for ref in ready:
                    if ref in recovering:
                        a = recovering.pop(ref)
                        try:
                            ray.get(ref)
                            self.restarting.pop(a, None)
                            idle.append(a)
                        except ActorUnavailableError:  # RESTARTING: Ray is bringing it back
                            if now < self.restarting[a]:
                                next_ping[a] = now + 0.5
                            else:
                                self.restarting.pop(a)
                                self.lost.add(a)
                                self._say(f"evaluator {a} did not come back within ray.restart_timeout_s "
                                          f"({restart_timeout:g} s): going on without it")
                        except (RayActorError, WorkerCrashedError, RayTaskError):
                            self.restarting.pop(a, None)
                            self.lost.add(a)  # out of restarts: gone for this run
                        continue
                    job, a, start = inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                        idle.append(a)
                    except (RayActorError, WorkerCrashedError, RayTaskError) as exc:
                        if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
                            idle.append(a)  # the task died, the actor did not
                        else:
                            restart(a, now)
                        if job.attempt < self.cfg.ray.retries:
                            retry.append(job.retried())
                            continue
                        result = {"status": "failed", "error": f"worker lost after {job.attempt + 1} attempts: {type(exc).__name__}"}
                    if result.get("status") == "stale":  # restarted with its constructor's data
                        if stale_updates > 4 * len(self.actors):
                            raise EvoError("evaluators keep losing their data updates; giving up")
                        stale_updates += 1
                        ray.get(self._send_update(self.actors[a]))
                        retry.insert(0, job)
                        continue
                    result["attempts"] = job.attempt + 1
                    result["dispatch"] = {"evaluator": a, "start": round(start, 4), "end": round(now, 4)}
                    deliver(job, result)
                for ref, (job, a, start) in list(inflight.items()):
                    if now - start > timeout:
                        # a hung candidate: restart its actor (Ray re-creates it) and count an attempt
                        inflight.pop(ref)
                        ray.kill(self.actors[a], no_restart=False)
                        idle.append(a)
                        if job.attempt < self.cfg.ray.retries:
                            retry.append(job.retried())
                        else:
                            deliver(job, {"status": "failed", "error": f"timed out after {timeout:.0f}s",
                                          "attempts": job.attempt + 1})
        finally:
            bar.close()


@dataclass
class Job:
    """One evaluation for :meth:`EvaluatorPool.stream`: the cache key its result is stored
    under, the Ray task name (``gXXXX-cYYY``), the recipe (as a dict) and where to score it."""

    key: str
    name: str
    recipe: dict
    reject_above: Any = None  # early rejection threshold (evo.scoring.evaluator.Evaluator.evaluate)
    blocks: dict[str, list[int]] | None = None
    collection: str = "valid"
    attempt: int = 0

    def retried(self) -> "Job":
        return replace(self, attempt=self.attempt + 1)
