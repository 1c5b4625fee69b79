"""Records that cross layers and are written to disk, as typed data.

A candidate's record is built by the loop (``evo.loop.generation``), appended by the run store
(``candidates.jsonl``) and read by ``evo status``, the report, releases and a stream's next
version. Its fields are named here once; ``to_dict`` is the JSON line, ``from_dict`` reads one
back (lines written before a field existed read as its default).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class CandidateRecord:
    generation: int
    candidate: str                      # its id in the run ("g0003-c007")
    status: str                         # ok, rejected (stopped early: a verdict), failed, invalid, ...
    parents: list[str] | None = None
    key: str = ""                       # recipe key | data version [| draw]: the fitness cache's key
    cached: bool = False                # taken from the cache, not evaluated now
    error: str | None = None
    values: list[float] | None = None   # objective values as the optimizer was told them (control-adjusted)
    raw_values: list[float] | None = None  # the same before the control adjustment
    se: float | None = None             # standard error of the paired difference to the control
    metrics: dict | None = None
    timings: dict | None = None
    dispatch: dict | None = None
    genome: list[float] | None = None
    recipe: dict | None = None          # Recipe.to_dict()
    data_version: str | None = None
    draw: str | None = None             # the generation's search blocks (evo.data.draws)
    evaluated_fraction: float | None = None
    lora: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a stream run's version

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        # the JSON line's field order, as candidates.jsonl has always had it
        head = {k: out.pop(k) for k in ("generation", "candidate", "parents", "key", "cached", "status")}
        return {**head, **out, **extra}

    @classmethod
    def from_dict(cls, data: dict) -> "CandidateRecord":
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})
