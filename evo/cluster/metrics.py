"""Run metrics exported through ``ray.util.metrics`` (Prometheus format on each node's metrics
port, and the dashboard's Metrics views once Prometheus/Grafana are configured).

Names (Ray prefixes them with ``ray_``): ``evo_generation``, ``evo_evaluations`` (counter, by
status), ``evo_objective_best`` / ``evo_objective_mean`` (by objective), ``evo_data_version``
(info gauge, 1 for the current version). Every series is tagged with the run name.
"""
from __future__ import annotations

from typing import Sequence


class RunMetrics:
    def __init__(self, run: str, objectives: Sequence[str]):
        from ray.util.metrics import Counter, Gauge

        self.run = run
        self.objectives = list(objectives)
        self.generation = Gauge("evo_generation", "last completed generation", tag_keys=("run",))
        self.evaluations = Counter("evo_evaluations", "candidate evaluations by status", tag_keys=("run", "status"))
        self.best = Gauge("evo_objective_best", "best value so far", tag_keys=("run", "objective"))
        self.mean = Gauge("evo_objective_mean", "mean over the generation", tag_keys=("run", "objective"))
        self.data = Gauge("evo_data_version", "1 for the data version in use", tag_keys=("run", "version"))

    def candidate(self, status: str) -> None:
        self.evaluations.inc(1, tags={"run": self.run, "status": status})

    def generation_done(self, row: dict, data_version: str) -> None:
        tags = {"run": self.run}
        self.generation.set(row["gen"], tags=tags)
        self.data.set(1, tags={**tags, "version": data_version})
        for j, name in enumerate(self.objectives):
            if row.get("best"):
                self.best.set(row["best"][j], tags={**tags, "objective": name})
            if row.get(f"{name}/mean") is not None:
                self.mean.set(row[f"{name}/mean"], tags={**tags, "objective": name})
