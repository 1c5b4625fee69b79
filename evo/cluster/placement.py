"""Where the evaluators go: can the cluster's alive nodes host them all, and the memory plan of
the node that will host the most. Asked of Ray once it is up, before any actor is created (an
actor that does not fit waits for ever, silently).
"""
from __future__ import annotations

import time

import ray

from evo.cluster.memory import plan_for
from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError


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
