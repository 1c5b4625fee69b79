"""Merge methods by the name a mergekit YAML uses: adding one is adding a module and a line."""

from __future__ import annotations

from types import MappingProxyType

from evo.merge.linear import Linear
from evo.merge.model_stock import ModelStock
from evo.merge.spherical import NuSlerp, Slerp
from evo.merge.task_arithmetic import FAMILY

METHODS = MappingProxyType({m.name: m for m in (Linear(), *FAMILY, Slerp(), NuSlerp(), ModelStock())})
