"""Data-flow space: which layers a token passes through, in what order, and how strongly.

The parameter space (``evo.search.space``) decides what each weight of one model is. The data-flow
space (Akiba et al., "Evolutionary Optimization of Model Merging Recipes", 2024) decides the path
instead: a sequence of up to ``repeats × L`` slots, slot ``t`` running layer ``t mod L`` of one
model, or nothing. Each slot may also scale its layer's residual update (the attention and MLP
output projections), which lets a path repeat a layer without doubling its effect.

A path is plain data (:class:`LayerPath`) and always has a mergekit form (:func:`path_slices`):
``slices:`` of one-model layer ranges under ``passthrough`` (``scale`` as a filter list on the
output projections), or, when the path runs the layers of a parameter-space merge ("merged"),
one-layer slices of that merge whose parameters are the merge's values at that layer. So every
candidate and every release is a config ``mergekit-yaml`` builds.

A space file with a data-flow part::

    name: dataflow_layers
    merge_method: passthrough
    dataflow:
      layers_from: models      # base and every source model; or ``merged``: the genes' merge
      repeats: 1               # slots = repeats × the base's num_hidden_layers
      scale: {low: 0.5, high: 1.5}   # optional, per slot (``models`` only: passthrough's scale)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evo.core.errors import EvoError

SKIP = "skip"
MERGED = "merged"  # a step that runs the parameter-space merge's layer
# where a decoder layer's residual update leaves it (Llama, Mistral, Qwen2, Gemma, Phi-3 names):
# scaling these two projections scales the layer's whole contribution to the residual stream
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


@dataclass(frozen=True)
class PathStep:
    """Layer ``layer`` of ``model`` (``merged``: the recipe's merge) with its update times ``scale``."""

    model: str
    layer: int
    scale: float = 1.0

    def to_dict(self) -> dict:
        return {"model": self.model, "layer": int(self.layer), "scale": float(self.scale)}


@dataclass(frozen=True)
class LayerPath:
    """The layers a token passes through, in order, over models of ``num_layers`` layers each."""

    num_layers: int
    steps: tuple[PathStep, ...]

    def to_dict(self) -> dict:
        return {"num_layers": int(self.num_layers), "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<recipe>") -> "LayerPath":
        where = f"{source}: path"
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
            raise EvoError(f"{where}: expected {{num_layers: L, steps: [{{model, layer, scale}}, ...]}}")
        n = data.get("num_layers")
        if type(n) is not int or n < 1:
            raise EvoError(f"{where}.num_layers: a positive integer, got {n!r}")
        steps = []
        for i, s in enumerate(data["steps"]):
            if not isinstance(s, dict) or not isinstance(s.get("model"), str) or type(s.get("layer")) is not int:
                raise EvoError(f"{where}.steps[{i}]: expected {{model: NAME, layer: INT, scale: FLOAT}}, got {s!r}")
            if not 0 <= s["layer"] < n:
                raise EvoError(f"{where}.steps[{i}].layer: {s['layer']} is outside 0..{n - 1}")
            scale = s.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise EvoError(f"{where}.steps[{i}].scale: a number, got {scale!r}")
            steps.append(PathStep(s["model"], s["layer"], float(scale)))
        return cls(n, tuple(steps))

    @property
    def uses_merge(self) -> bool:
        return any(s.model == MERGED for s in self.steps)


@dataclass(frozen=True)
class DataflowSpec:
    """The ``dataflow:`` part of a space file."""

    layers_from: str          # "models" (base + sources) or "merged"
    repeats: int = 1
    scale: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "DataflowSpec":
        where = f"{source}: dataflow"
        if not isinstance(data, dict):
            raise EvoError(f"{where}: must be a mapping (layers_from, repeats, scale)")
        unknown = sorted(set(data) - {"layers_from", "repeats", "scale"})
        if unknown:
            raise EvoError(f"{where}: unknown field '{unknown[0]}' (known: layers_from, repeats, scale)")
        frm = data.get("layers_from", "models")
        if frm not in ("models", MERGED):
            raise EvoError(f"{where}.layers_from: 'models' or 'merged', got {frm!r}")
        repeats = data.get("repeats", 1)
        if type(repeats) is not int or not 1 <= repeats <= 4:
            raise EvoError(f"{where}.repeats: an integer from 1 to 4, got {repeats!r}")
        scale = data.get("scale")
        if scale is not None:
            if not (isinstance(scale, dict) and set(scale) == {"low", "high"}
                    and all(isinstance(scale[k], (int, float)) and not isinstance(scale[k], bool) for k in scale)
                    and 0 < scale["low"] <= scale["high"]):
                raise EvoError(f"{where}.scale: expected {{low: A, high: B}} with 0 < A <= B, got {scale!r}")
            if frm == MERGED:
                raise EvoError(f"{where}.scale: only with layers_from: models (mergekit's scale is a "
                               "passthrough parameter; a merged layer has no passthrough)")
            scale = (float(scale["low"]), float(scale["high"]))
        return cls(frm, repeats, scale)


def path_slices(path: LayerPath, merge) -> "Any":
    """The mergekit form of a path: a ``slices:`` MergeConfig that ``mergekit-yaml`` and
    ``evo merge`` both build into the model the evaluator measured.

    ``merge`` is the recipe's parameter-space merge (used by ``merged`` steps; ignored otherwise).
    """
    from evo.merge.config import MergeConfig

    if path.uses_merge:
        if any(s.model != MERGED for s in path.steps):
            raise EvoError("a path mixes merged layers with single models' layers; mergekit has one "
                           "merge method per config")
        return MergeConfig.from_dict(_merged_slices(path, merge), source="<data-flow recipe>")
    runs: list[list[PathStep]] = []
    for s in path.steps:
        last = runs[-1][-1] if runs else None
        if last and s.model == last.model and s.scale == last.scale and s.layer == last.layer + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    slices = []
    for run in runs:
        entry: dict = {"sources": [{"model": run[0].model, "layer_range": [run[0].layer, run[-1].layer + 1]}]}
        if run[0].scale != 1.0:
            entry["parameters"] = {"scale": [{"filter": f, "value": run[0].scale} for f in RESIDUAL_OUTPUTS]}
        slices.append(entry)
    return MergeConfig.from_dict({"merge_method": "passthrough", "slices": slices, "dtype": merge.dtype},
                                 source="<data-flow recipe>")


def _merged_slices(path: LayerPath, merge) -> dict:
    """One one-layer slice per step of a merged path: each source's parameters become their value
    at that layer (a filter list: ``layers.`` for the layer's tensors, the value at t = 0 for the
    embeddings, norm and head that mergekit takes from the first and last slice), so every layer
    and every tensor outside the layers is exactly the whole-model merge's."""
    from evo.merge.params import evaluate

    L = path.num_layers

    def at(setting, layer: int):
        if isinstance(setting, dict) or (isinstance(setting, list) and any(isinstance(e, dict) for e in setting)):
            raise EvoError("a merged data-flow path needs scalar or gradient parameters, not filter lists")
        t = layer / (L - 1) if L > 1 else 1.0
        inside, outside = evaluate(setting, f"model.layers.{layer}.x", t), evaluate(setting, "model.embed_tokens", 0.0)
        return inside if inside == outside else [{"filter": "layers.", "value": inside}, {"value": outside}]

    entries = list(merge.models)
    names = [e.model for e in entries]
    if merge.base_model and merge.base_model not in names:
        from evo.merge.config import ModelEntry

        entries.insert(0, ModelEntry(merge.base_model, {}))
    from evo.merge.registry import METHODS

    if METHODS[merge.merge_method].random:
        raise EvoError(f"a merged data-flow path cannot use the random method {merge.merge_method!r}: its "
                       "masks are drawn per tensor name, which a slice renames")
    slices = []
    for s in path.steps:
        srcs = []
        for e in entries:
            src: dict = {"model": e.model, "layer_range": [s.layer, s.layer + 1]}
            if e.parameters:
                src["parameters"] = {k: at(v, s.layer) for k, v in e.parameters.items()}
            srcs.append(src)
        entry: dict = {"sources": srcs}
        if merge.parameters:
            entry["parameters"] = {k: at(v, s.layer) for k, v in merge.parameters.items()}
        slices.append(entry)
    out: dict = {"merge_method": merge.merge_method, "slices": slices, "dtype": merge.dtype}
    if merge.base_model:
        out["base_model"] = merge.base_model
    return out
