"""Ray start-up and shut-down at the edge of a run: connect to a cluster or start an embedded,
loopback-only local Ray, with signals and Ray's start-up quirks handled.

Ray gives no public switch for some of what evo needs here (keep evo's SIGTERM handler, bind an
embedded node to loopback), so two context managers patch ``ray._private`` for the length of
``ray.init`` only, and put it back.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import ray

from evo.cluster.network import check_reachable, is_loopback, url_host
from evo.core.config import ExperimentConfig


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
def signals_held():
    """SIGINT/SIGTERM recorded instead of acted on for the block (main thread only); yields the
    list of those received, for the caller to honour once the block is done. A stop in the
    middle of ``ray.shutdown`` would cut it short and orphan Ray's agents."""
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
        if url and rc.dashboard and not is_loopback(rc.dashboard_host):
            # Ray's context names 127.0.0.1 whatever the dashboard binds: say where it listens
            port = url.rsplit(":", 1)[-1].strip("/")
            url = f"http://{url_host(rc.dashboard_host)}:{port}"
            print(f"evo: warning: the Ray dashboard listens on {rc.dashboard_host}:{port} "
                  f"({'every interface' if rc.dashboard_host in ('0.0.0.0', '::') else 'not loopback'}): anyone who "
                  "can reach it and holds the token can run code on this machine (ray.dashboard_host)",
                  file=sys.stderr, flush=True)
        return True, url
    return True, _dashboard_url(ctx)


class _DropTokenBanner:
    """A logging filter for Ray's start-up banner ("Token authentication is enabled for this Ray
    cluster ..."): with ``configure_logging=False`` it reached the user's stderr through
    Python's last-resort handler, a second line before evo's own. evo prints the dashboard URL and
    points to docs/running.md's token section instead."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


@contextlib.contextmanager
def _quiet_token_banner():
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
