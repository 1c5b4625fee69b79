"""Typed genes: each maps one coordinate of the unit vector in [0, 1] to a value and back.

The optimizers see only the unit vector; a gene says what its coordinate means (a float on a
linear or log scale, an int, a choice among categories). ``gene_from_spec`` reads a space file's
``genes:`` entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


SCOPES = ("global", "layer", "model", "model_layer")


@dataclass(frozen=True)
class FloatGene:
    """A real value in [low, high]; ``log`` spaces it geometrically (learning rates)."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")

    def decode(self, u: float) -> float:
        u = min(max(float(u), 0.0), 1.0)
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))

    def encode(self, v: float) -> float:
        if self.high == self.low:
            return 0.5
        if self.log:
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (float(v) - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class IntGene:
    """An integer in [low, high]: [0,1] is cut into equal bins, one per value (geometric if log)."""

    low: int
    high: int
    log: bool = False

    def __post_init__(self):
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")

    def decode(self, u: float) -> int:
        u = min(max(float(u), 0.0), 1.0)
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high + 1)
            return int(min(self.high, max(self.low, math.floor(math.exp(lo + u * (hi - lo))))))
        return int(min(self.high, self.low + math.floor(u * (self.high - self.low + 1))))

    def encode(self, v: int) -> float:
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high + 1)
            return (math.log(int(v) + 0.5) - lo) / (hi - lo)
        return (int(v) - self.low + 0.5) / (self.high - self.low + 1)


@dataclass(frozen=True)
class CategoricalGene:
    """One of ``choices``: [0,1] is cut into equal bins."""

    choices: tuple

    def __post_init__(self):
        if len(self.choices) == 0:
            raise ValueError("choices is empty")

    def decode(self, u: float):
        u = min(max(float(u), 0.0), 1.0)
        return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]

    def encode(self, v) -> float:
        if v not in self.choices:
            raise ValueError(f"{v!r} is not one of {list(self.choices)}")
        return (self.choices.index(v) + 0.5) / len(self.choices)


def BoolGene() -> CategoricalGene:
    return CategoricalGene((False, True))


GENE_TYPES = ("float", "int", "categorical", "bool")


def gene_from_spec(spec: dict) -> Any:
    """Build a gene from its YAML mapping; raises ValueError/KeyError naming the problem."""
    kind = spec.get("type")
    if kind is None:
        raise KeyError("type")
    extra = set(spec) - {"type", "low", "high", "log", "choices", "scope"}
    if extra:
        raise ValueError(f"unknown key(s) {sorted(extra)}")
    if kind in ("float", "logfloat", "log-float"):
        for key in ("low", "high"):
            if key not in spec:
                raise KeyError(key)
        return FloatGene(float(spec["low"]), float(spec["high"]), bool(spec.get("log", kind != "float")))
    if kind == "int":
        for key in ("low", "high"):
            if key not in spec:
                raise KeyError(key)
        return IntGene(int(spec["low"]), int(spec["high"]), bool(spec.get("log", False)))
    if kind == "categorical":
        if "choices" not in spec:
            raise KeyError("choices")
        return CategoricalGene(tuple(spec["choices"]))
    if kind == "bool":
        return BoolGene()
    raise ValueError(f"unknown gene type {kind!r} (expected one of {', '.join(GENE_TYPES)}, logfloat)")
