"""Evaluator actors on Ray: started once per run, fed candidates as named tasks.

Each actor receives the resident sources once (object refs resolved zero-copy on the node).
Candidates run as actor tasks named ``gXXXX-cYYY`` so the dashboard shows the population. A
candidate whose worker dies is re-run (the actor is restarted by Ray) up to ``ray.retries``
times; one that times out has its actor killed and restarted; a candidate that raises is
returned as failed by the evaluator itself.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError
from tqdm import tqdm

from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.scoring.evaluator import Evaluator
from evo.cluster.memory import check_plan, object_store_bytes, plan_for
from evo.scoring.rejection import RejectionTest
from evo.scoring.sources import Sources


class Interrupted(EvoError):
    """A stop was requested (SIGINT/SIGTERM) while candidates were being evaluated."""


def start_ray(cfg: ExperimentConfig, object_store: int | None = None) -> tuple[bool, str | None]:
    """Connect to a cluster (``ray.address`` / ``RAY_ADDRESS``) or start an embedded local Ray
    (``object_store``: its object store's bytes where ``ray.object_store_mb`` is unset).

    Returns (whether we started it, dashboard URL). A Ray already initialised in this process
    (a notebook, a test session) is reused as is.
    """
    if ray.is_initialized():
        return False, _dashboard_url(None)
    if threading.current_thread() is not threading.main_thread():
        return _init_ray(cfg, object_store)
    # ray.init installs a SIGTERM handler that raises SystemExit(15) wherever the main thread is,
    # even inside a finalizer, where Python swallows it ("Exception ignored"): a SIGTERM during
    # start-up was then lost and the run went on to exit 0. During ray.init evo's own handler only
    # records the signal (Ray's is not installed), and a SIGTERM received is a clean stop after it.
    previous = signal.getsignal(signal.SIGTERM)
    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with _ray_keeps_sigterm_handler():
            started = _init_ray(cfg, object_store)
    finally:
        # the caller's handler (evo's CLI turns SIGTERM into a clean stop); without one, exit as
        # Ray's handler would (atexit then shuts Ray down)
        signal.signal(signal.SIGTERM, previous if callable(previous) else _exit_on_sigterm)
    if received:
        if started[0]:
            ray.shutdown()
        raise KeyboardInterrupt
    return started


@contextlib.contextmanager
def _signals_held():
    """SIGINT/SIGTERM recorded instead of acted on for the block (main thread only); yields the
    list of those received, for the caller to honour once the block is done."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_on_sigterm(signum, frame):
    sys.exit(signum)


@contextlib.contextmanager
def _ray_keeps_sigterm_handler():
    """Stop ``ray.init`` from replacing the SIGTERM handler (no public switch: it calls
    ``ray._private.utils.set_sigterm_handler`` unconditionally in the main thread)."""
    from ray._private import utils as ray_utils

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def _init_ray(cfg: ExperimentConfig, object_store: int | None) -> tuple[bool, str | None]:
    rc = cfg.ray
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, rc.connect_timeout_s)
        ctx = ray.init(address=address, log_to_driver=False)
    else:
        kwargs = dict(
            address="local",
            include_dashboard=rc.dashboard,
            dashboard_host=rc.dashboard_host,  # loopback by default: never exposed
            dashboard_port=rc.dashboard_port,
            log_to_driver=False,
            configure_logging=False,
        )
        if rc.object_store_mb:
            kwargs["object_store_memory"] = rc.object_store_mb * 1024**2
        elif object_store:
            kwargs["object_store_memory"] = object_store
        if rc.metrics_export_port:
            kwargs["_metrics_export_port"] = rc.metrics_export_port  # evo_* metrics: /metrics there
        if rc.temp_dir:
            kwargs["_temp_dir"] = rc.temp_dir
        with _loopback_node(), normal_priority_workers(), _quiet_token_banner():
            ctx = ray.init(**kwargs)
        url = _dashboard_url(ctx)
        if url and rc.dashboard and not _is_loopback(rc.dashboard_host):
            # Ray's context names 127.0.0.1 whatever the dashboard binds: say where it listens
            port = url.rsplit(":", 1)[-1].strip("/")
            url = f"http://{_url_host(rc.dashboard_host)}:{port}"
            print(f"evo: warning: the Ray dashboard listens on {rc.dashboard_host}:{port} "
                  f"({'every interface' if rc.dashboard_host in ('0.0.0.0', '::') else 'not loopback'}): anyone who "
                  "can reach it and holds the token can run code on this machine (ray.dashboard_host)",
                  file=sys.stderr, flush=True)
        return True, url
    return True, _dashboard_url(ctx)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _DropTokenBanner:
    """A logging filter for Ray's start-up banner ("Token authentication is enabled for this Ray
    cluster ..."): with ``configure_logging=False`` it reached the user's stderr through
    Python's last-resort handler, a second line before evo's own. evo prints the dashboard URL and
    points to docs/running.md's token section instead."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


@contextlib.contextmanager
def _quiet_token_banner():
    import logging

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    drop = _DropTokenBanner()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def normal_priority_workers():
    """Start Ray's workers at the driver's priority. Ray runs workers at niceness 15 (its
    ``worker_niceness``) to keep the driver responsive, but evo's workers are its evaluators, the
    whole workload: beside three busy loops at normal priority they were measured getting ~3 %
    of a core, so a run on a shared machine (a CI runner) crawled for an hour. ``RAY_worker_niceness``
    set by the user wins; the raylet reads it from the environment it is started with."""
    key = "RAY_worker_niceness"
    mine = key not in os.environ
    if mine:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if mine:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _loopback_node():
    """An embedded single-node Ray whose every server listens on 127.0.0.1 only.

    Ray 2.60 gives ``ray.init`` no bind address: GCS, raylet and core workers listen on all
    interfaces and the agents on the node IP, unless the node IP is localhost, and
    ``_node_ip_address="127.0.0.1"`` is replaced by the machine's IP (``resolve_ip_for_localhost``).
    The node IP is localhost when ``ray_constants.ENABLE_RAY_CLUSTER`` (env
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read at import) is off, the single-machine mode, so it
    is switched off for this start only (upstream ray-project/ray#59852 binds to the node IP).
    A node started this way cannot be joined by other machines, which an embedded Ray never is.
    """
    from ray._private import ray_constants  # no public switch (see above)

    previous = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if previous is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous is not None:
            ray_constants.ENABLE_RAY_CLUSTER = previous


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail in one line when nothing listens at a ``host:port`` (or ``ray://host:port``) cluster
    address: ``ray.init`` itself retries a dead address for minutes. ``auto`` (read from the
    local node's files) is left to Ray."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise EvoError(f"ray.address: nothing answers at {address} within {timeout_s:g} s "
                       f"({exc.strerror or exc}); is the cluster up? (ray.connect_timeout_s)") from None
    if "://" not in address:  # host:port is a GCS; ray:// is Ray Client's server, another service
        _check_gcs(address, timeout_s)


def _check_gcs(address: str, timeout_s: float) -> None:
    """Ask the server at ``address`` what a Ray GCS answers first (``GetClusterId``, the call
    ``ray.init`` starts with). Something that accepts TCP but is not Ray (a web server, a proxy)
    made ``ray.init`` retry for minutes, deaf to SIGINT/SIGTERM; here it is one line within
    ``ray.connect_timeout_s``. A GCS that refuses the call for want of a token is still Ray."""
    import grpc  # Ray's own RPC library, installed with it

    channel = grpc.insecure_channel(address)
    try:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call(b"", timeout=timeout_s)  # an empty GetClusterIdRequest
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return
        why = {grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer within {timeout_s:g} s",
               grpc.StatusCode.UNIMPLEMENTED: "it does not serve Ray's GCS calls"}.get(code, "not a gRPC server")
        raise EvoError(f"ray.address: {address} is not a Ray cluster's GCS ({why}); give the head node's "
                       "GCS address (host:6379 by default, as `ray start --head` prints)") from None
    finally:
        channel.close()


def check_resources(cfg: ExperimentConfig, *, wait_s: float, say=print) -> None:
    """Refuse in one line when no configuration of the cluster's nodes can host the evaluators
    (an actor that does not fit waits for ever, silently). With ``wait_s`` > 0 (a cluster that
    may autoscale) wait that long for nodes to join, saying what for."""
    rc = cfg.ray
    need = {"CPU": rc.cpus_per_evaluator, "GPU": rc.gpus_per_evaluator}
    deadline, said = time.monotonic() + wait_s, False
    while True:
        problem = _placement_problem(need, rc.evaluators)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise EvoError(f"ray: {problem} (set ray.evaluators, ray.cpus_per_evaluator or ray.gpus_per_evaluator)")
        if not said:
            say(f"waiting up to {wait_s:g} s for the cluster to grow: {problem}")
            said = True
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def _placement_problem(need: dict[str, float], evaluators: int) -> str | None:
    """Why ``evaluators`` actors needing ``need`` each cannot all be placed on the alive nodes
    (packed greedily per node), or None."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = 0
    for res in nodes:
        fits += _room(res, need, evaluators)
    if fits >= evaluators:
        return None
    largest = {k: max((res.get(k, 0.0) for res in nodes), default=0.0) for k in need}
    total = {k: sum(res.get(k, 0.0) for res in nodes) for k in need}
    wants = ", ".join(f"{v:g} {k}{'s' if v != 1 else ''}" for k, v in need.items() if v > 0)
    offers = ", ".join(f"{total[k]:g} {k}s in all, at most {largest[k]:g} on one node" for k, v in need.items() if v > 0)
    return (f"{evaluators} evaluator{'s need' if evaluators != 1 else ' needs'} {wants} each; the cluster offers "
            f"{offers} (room for {fits})")


def _room(res: dict, need: dict[str, float], evaluators: int) -> int:
    """How many evaluators needing ``need`` each one node with resources ``res`` can host."""
    return min([int(res.get(k, 0.0) // v) for k, v in need.items() if v > 0] + [evaluators])


def cluster_plan(cfg: ExperimentConfig):
    """The memory plan of the alive node that will host the most evaluators (CPU/GPU packing as
    :func:`_placement_problem`), against the memory Ray reports for it (its ``memory`` and
    ``object_store_memory`` resources)."""
    need = {"CPU": cfg.ray.cpus_per_evaluator, "GPU": cfg.ray.gpus_per_evaluator}
    best = (0, None)
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        k = _room(res, need, cfg.ray.evaluators)
        if k > best[0]:
            best = (k, int(res.get("memory", 0) + res.get("object_store_memory", 0)) or None)
    return plan_for(cfg, evaluators_per_node=max(best[0], 1), node_available=best[1])


def _dashboard_url(ctx) -> str | None:
    """The dashboard's URL: from ``ray.init``'s context, else (a Ray this process had already
    started) from the node's address info. None when the dashboard is off."""
    try:
        url = getattr(ctx, "dashboard_url", None) if ctx is not None else None
        if not url:
            info = ray._private.worker.global_worker.node.address_info  # noqa: SLF001 (no public accessor)
            url = info.get("webui_url")
    except Exception:
        return None
    if url and not url.startswith("http"):
        url = "http://" + url
    return url or None


class EvaluatorPool:
    """A fixed set of evaluator actors and a dispatch loop that keeps each one busy."""

    def __init__(self, cfg: ExperimentConfig, sources: Sources | Callable[..., Sources], *, run_name: str = "run",
                 quiet: bool = False):
        """``sources``: loaded :class:`Sources`, or ``loader(put=...) -> Sources`` called once Ray
        is up, so each task vector goes into the object store as it is made (the driver's peak
        is then one model, not all of them)."""
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
                with _signals_held():
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
        actor_cls = ray.remote(Evaluator)
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
        with _signals_held() as held:
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
