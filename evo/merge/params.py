"""Resolve mergekit parameter settings (scalars, gradients, filter lists) for one tensor.

Kept separate from the methods so the per-tensor math never parses config, and from the config
module so validation and resolution agree on one definition of a "setting".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from evo.core.errors import EvoError

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a merge method accepts.

    Args:
        name: the YAML key.
        kind: ``float`` or ``bool``.
        per_model: True when each model entry may set it (mergekit's non-base/input scope); such
            parameters may also appear globally as a default for every model.
        default: value when nobody sets it, or ``REQUIRED``.
    """

    name: str
    kind: type
    per_model: bool
    default: Any = REQUIRED


def layer_t(tensor_name: str, num_layers: int) -> float:
    """Position of a tensor in the layer stack: i/(L-1) for ``layers.i``, 0 for other tensors.

    A single-layer model gives t=1, as mergekit's planner does.
    """
    m = LAYER_RE.search(tensor_name)
    if m is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, int(m.group(1)) / (num_layers - 1))


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """Value of one setting for a tensor at layer position t, or None when no filter matches.

    Numeric lists interpolate piecewise-linearly at t·(n−1) (mergekit "gradient"); non-numeric
    lists pick the anchor at int(t·(n−1)); filter lists take the first entry whose filter is a
    substring of the tensor name (a missing filter or ``*`` matches everything).
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        filt = cond.get("filter")
        if filt is None or filt == "*" or filt in tensor_name:
            return evaluate(cond["value"], tensor_name, t)
    return None


def resolve(spec: ParamSpec, sources: list[dict], tensor_name: str, t: float, where: str) -> Any:
    """First non-None value of ``spec`` among ``sources`` (highest precedence first), cast to kind."""
    for src in sources:
        if spec.name in src:
            value = evaluate(src[spec.name], tensor_name, t)
            if value is not None:
                return bool(value) if spec.kind is bool else float(value)
    if spec.default is REQUIRED:
        raise EvoError(f"{where}: parameter '{spec.name}' is required (tensor {tensor_name})")
    return spec.default
