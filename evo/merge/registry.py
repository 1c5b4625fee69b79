"""Merge methods by the name a mergekit YAML uses: adding one is adding a module and a line."""

from __future__ import annotations

from types import MappingProxyType

from evo.merge.arcee_fusion import ArceeFusion
from evo.merge.linear import Linear
from evo.merge.model_stock import ModelStock
from evo.merge.nearswap import NearSwap
from evo.merge.passthrough import Passthrough
from evo.merge.ram import Ram, RamPlusTL
from evo.merge.sce import Sce
from evo.merge.spherical import NuSlerp, Slerp
from evo.merge.spherical_mean import Karcher, MultiSlerp
from evo.merge.task_arithmetic import FAMILY

METHODS = MappingProxyType({m.name: m for m in (Linear(), *FAMILY, Slerp(), NuSlerp(), ModelStock(), Sce(),
                                                NearSwap(), MultiSlerp(), Karcher(), Passthrough(), Ram(), RamPlusTL(),
                                                ArceeFusion())})
