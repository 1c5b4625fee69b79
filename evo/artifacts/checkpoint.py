"""``checkpoint.json``: where a run is, as one typed record.

Written (atomically, by :class:`evo.artifacts.store.RunStore`) after every generation, every step of the
continual loop and the selection stage; read by ``evo resume``, ``evo export``, ``evo status``
and the report. The loops build it with :meth:`Checkpoint.of` and add only their own part
(``steady_state``, ``stream``, ``selection``), so the record has one definition.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from evo.core.errors import EvoError

VERSION = 1


@dataclass
class Checkpoint:
    generation: int  # complete generations (results told // population in steady state)
    generations: int  # the configured budget (fixed-data runs)
    optimizer: dict  # Optimizer.state(): population, hall of fame, RNG states
    logbook: list[dict]  # one row per generation
    data_version: str
    objectives: list[dict]  # ObjectiveConfig fields, in order
    space: dict  # {"name", "labels", "models"}: the genome's layout
    best: dict | None = None  # {"id", "genome", "values", "recipe"}
    hall_of_fame: list[dict] = field(default_factory=list)
    version: int = VERSION
    evidence: dict = field(default_factory=dict)  # fixed-data runs: elites' adjusted values per draw
    data_inputs: dict = field(default_factory=dict)  # what the data version was computed from
    steady_state: dict | None = None  # evo.loop.steady_state.SteadyStateState
    stream: dict | None = None  # the continual loop's state (a stream run)
    selection: dict | None = None  # the selection stage's record (a finished fixed-data run)
    comparison: dict | None = None  # its comparison table
    pid: int | None = None  # the driver that wrote it

    @classmethod
    def of(cls, cfg, optimizer, logbook: list[dict], space, data_version: str, **extra: Any) -> "Checkpoint":
        best = optimizer.best()

        def entry(e) -> dict:
            return {"id": e.id, "genome": e.genome, "values": e.values, "recipe": space.decode(e.genome).to_dict()}

        return cls(
            generation=optimizer.generation, generations=cfg.optimizer.generations, optimizer=optimizer.state(),
            logbook=logbook, data_version=data_version, objectives=[dataclasses.asdict(o) for o in cfg.objectives],
            space={"name": space.spec.name, "labels": space.labels, "models": list(space.models)},
            best=None if best is None else entry(best), hall_of_fame=[entry(e) for e in optimizer.hall_of_fame],
            **extra)

    @property
    def is_stream(self) -> bool:
        return self.stream is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "checkpoint.json") -> "Checkpoint":
        names = {f.name for f in dataclasses.fields(cls)}
        if data.get("version", VERSION) > VERSION:
            raise EvoError(f"{where}: written by a newer evo (checkpoint version {data['version']})")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise EvoError(f"{where}: not a checkpoint of this evo ({exc})") from None
