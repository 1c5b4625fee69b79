"""Run metrics exported through ``ray.util.metrics`` (Prometheus format on each node's metrics
port, and the dashboard's Metrics views once Prometheus/Grafana are configured).

Names (Ray prefixes them with ``ray_``): ``evo_generation``, ``evo_evaluations`` (counter, by
status), ``evo_objective_best`` / ``evo_objective_mean`` (by objective), ``evo_data_version``
(info gauge, 1 for the current version); for a stream run, after each version: ``evo_version_gain``
(release objective gained over the release before it), ``evo_retention_drift_worst`` (the worst
older stratum's loss since its anchor) and ``evo_version_seconds`` (by step: install, reevaluate,
evolve, export). Every series is tagged with the run name.
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
        self.gain = Gauge("evo_version_gain", "release objective gained on the newest version", tag_keys=("run",))
        self.drift = Gauge("evo_retention_drift_worst", "worst older stratum's loss since its anchor", tag_keys=("run",))
        self.seconds = Gauge("evo_version_seconds", "wall seconds of the last version, by step", tag_keys=("run", "step"))

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

    def version_done(self, entry: dict) -> None:
        """A stream version's release step is over: its gain, worst drift and time per step."""
        tags = {"run": self.run}
        if entry.get("gain") is not None:
            self.gain.set(entry["gain"], tags=tags)
        if entry.get("drift"):
            self.drift.set(max(entry["drift"].values()), tags=tags)
        for step, seconds in (entry.get("seconds") or {}).items():
            self.seconds.set(seconds, tags={**tags, "step": step})
