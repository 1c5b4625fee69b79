"""The ask/tell face every optimizer shares, and the registry that names them.

``ask()`` returns the genomes of the next generation (unit vectors), ``tell(genomes, values)``
gives back one objective tuple per genome (``None`` for a failed candidate), ``state()`` and
``from_state()`` round-trip through JSON for checkpoints. The Ray loop, the benchmark harness
and a Tune searcher drive every optimizer the same way.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from evo.errors import EvoError

OPTIMIZERS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls):
        cls.name = name
        OPTIMIZERS[name] = cls
        return cls

    return wrap


def make_optimizer(name: str, dim: int, *, directions: Sequence[str], seed: int, options: dict | None = None):
    """Build a registered optimizer by name; unknown names and options fail with one line."""
    if name not in OPTIMIZERS:
        raise EvoError(f"optimizer.name: unknown optimizer {name!r} (known: {', '.join(sorted(OPTIMIZERS))})")
    cls = OPTIMIZERS[name]
    try:
        return cls(dim, directions=tuple(directions), seed=seed, **(options or {}))
    except TypeError as exc:
        raise EvoError(f"optimizer.options: {exc}") from None


def restore_optimizer(state: dict):
    return OPTIMIZERS[state["name"]].from_state(state)


@dataclass
class Evaluated:
    """A genome with its objective values (``None`` when the candidate failed) and the id the
    caller gave it (a candidate name), so offspring can name their parents."""

    genome: list[float]
    values: list[float] | None
    id: str | None = None

    def to_dict(self):
        values = None if self.values is None else list(map(float, self.values))
        return {"genome": list(map(float, self.genome)), "values": values, "id": self.id}

    @classmethod
    def from_dict(cls, d):
        return cls(list(d["genome"]), d["values"], d.get("id"))


def evaluated(genomes, values, ids=None) -> list[Evaluated]:
    ids = list(ids) if ids is not None else [None] * len(genomes)
    return [
        Evaluated(list(map(float, g)), None if v is None else list(map(float, v)), i)
        for g, v, i in zip(genomes, values, ids)
    ]


def signs(directions: Sequence[str]) -> tuple[float, ...]:
    """DEAP-style weights: +1 to maximise, -1 to minimise."""
    out = []
    for d in directions:
        if d not in ("minimize", "maximize"):
            raise EvoError(f"objective goal must be 'minimize' or 'maximize', got {d!r}")
        out.append(1.0 if d == "maximize" else -1.0)
    return tuple(out)


def worst_values(directions: Sequence[str]) -> list[float]:
    """Objective values that lose to every real candidate (a failed evaluation)."""
    return [math.inf if d == "minimize" else -math.inf for d in directions]


def scalar_score(values: Sequence[float] | None, directions: Sequence[str], weights: Sequence[float] | None = None) -> float:
    """Weighted sum, oriented so that *higher is better*; failed candidates score -inf."""
    if values is None or any(not math.isfinite(v) for v in values):
        return -math.inf
    weights = weights or [1.0] * len(values)
    return float(sum(s * w * v for s, w, v in zip(signs(directions), weights, values)))


@contextmanager
def deap_random(state):
    """Run DEAP operators (which use the module-level ``random``) on our own RNG state.

    The caller's global random state is restored afterwards, so two optimizers in one process
    never disturb each other and a checkpointed state replays exactly.
    """
    outer = random.getstate()
    random.setstate(state.value)
    try:
        yield
    finally:
        state.value = random.getstate()
        random.setstate(outer)


@dataclass
class RandomState:
    """A ``random.Random`` state that survives JSON (tuples become lists on the way)."""

    value: tuple

    @classmethod
    def seeded(cls, seed: int) -> "RandomState":
        return cls(random.Random(seed).getstate())

    def to_json(self):
        version, internal, gauss = self.value
        return [version, list(internal), gauss]

    @classmethod
    def from_json(cls, data) -> "RandomState":
        return cls((data[0], tuple(data[1]), data[2]))


def numpy_state_to_json(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def numpy_rng_from_json(state: dict) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    return rng
