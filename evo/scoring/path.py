"""Run a data-flow path (``evo.search.dataflow.LayerPath``) without building its model.

A candidate of the data-flow space is a sequence of layers taken from models the evaluator already
holds. Copying those layers into a deeper model would cost a model's worth of memory traffic per
candidate; instead the evaluator's own model (the "shell") has its layer list, embeddings, final
norm and head swapped for references to the resident models' modules for one forward pass, then
restored. transformers' own forward runs unchanged (masks, rotary embeddings), so the path costs
one forward pass over its layers.

A step's ``scale`` multiplies its layer's attention and MLP output projections (what mergekit's
``passthrough`` ``scale`` does to those weights): forward hooks multiply the projections' outputs
while that step runs. In float32 this equals the scaled weights up to rounding (~1e-7 relative);
the exported release is re-measured from its real weights by ``evo verify``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from evo.core.errors import EvoError
from evo.search.dataflow import MERGED, RESIDUAL_OUTPUTS, LayerPath


def _scale_output(module: nn.Module, args, output):
    scale = module.__dict__.get("_evo_scale")
    return output if scale is None else output * scale


class _ScaledLayer(nn.Module):
    """One path step: a resident decoder layer whose residual update is scaled by ``scale``."""

    def __init__(self, layer: nn.Module, scale: float, where: str):
        super().__init__()
        self.layer = layer
        self.scale = float(scale)
        self.projections = []
        if self.scale != 1.0:
            for name, module in layer.named_modules():
                if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS:
                    self.projections.append(module)
                    if not module.__dict__.get("_evo_hooked"):
                        module.register_forward_hook(_scale_output)
                        module._evo_hooked = True
            if len(self.projections) != len(RESIDUAL_OUTPUTS):
                raise EvoError(f"{where}: a scaled path step needs the layer's {' and '.join(RESIDUAL_OUTPUTS)} "
                               f"projections; {type(layer).__name__} has {len(self.projections)} of them")

    def __getattr__(self, name):  # the model's forward may read layer attributes (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        for m in self.projections:
            m._evo_scale = self.scale
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            for m in self.projections:
                m._evo_scale = None


@contextmanager
def path_model(shell: nn.Module, path: LayerPath, model_of: Callable[[str], nn.Module]):
    """``shell`` running ``path``, for the duration of the block. ``model_of(name)`` gives a resident
    model (same architecture); a ``merged`` step runs the shell's own layer. Embeddings come from
    the first step's model and the final norm (and an untied head) from the last step's, as in
    mergekit's ``slices``. The cache is off: a path may run one layer twice."""
    inner, config = shell.base_model, shell.config
    saved = {"embed_tokens": inner.embed_tokens, "layers": inner.layers, "norm": inner.norm}
    saved_head, saved_cfg = shell.lm_head, {k: getattr(config, k, None) for k in ("num_hidden_layers", "use_cache", "layer_types")}
    own_layers = saved["layers"]

    def owner(name: str) -> nn.Module:
        return shell if name == MERGED else model_of(name)

    def layers_of(name: str):
        return own_layers if name == MERGED else owner(name).base_model.layers

    first, last = owner(path.steps[0].model), owner(path.steps[-1].model)
    n = len(own_layers)
    if path.num_layers != n:
        raise EvoError(f"the path was made for models of {path.num_layers} layers; these have {n}")
    steps = [_ScaledLayer(layers_of(s.model)[s.layer], s.scale, f"path step {i} ({s.model} layer {s.layer})")
             for i, s in enumerate(path.steps)]
    types = saved_cfg["layer_types"]
    try:
        inner.embed_tokens = saved["embed_tokens"] if first is shell else first.base_model.embed_tokens
        inner.norm = saved["norm"] if last is shell else last.base_model.norm
        head_from = first if getattr(config, "tie_word_embeddings", False) else last
        shell.lm_head = saved_head if head_from is shell else head_from.lm_head
        inner.layers = nn.ModuleList(steps)
        config.num_hidden_layers = len(steps)
        config.use_cache = False
        if isinstance(types, (list, tuple)):
            config.layer_types = [types[s.layer] for s in path.steps]
        yield shell
    finally:
        for k, v in saved.items():
            setattr(inner, k, v)
        shell.lm_head = saved_head
        for k, v in saved_cfg.items():
            if v is not None or hasattr(config, k):
                setattr(config, k, v)


def resident_model(build: Callable[[], nn.Module], base: dict, delta: dict | None, device) -> nn.Module:
    """A whole model held for data-flow paths: ``base`` (+ ``delta``) widened to float32 per tensor
    and rounded once into the model's dtype, as the evaluator's merges are. Names absent from
    ``base`` (a tied head) are left to the model's tying."""
    model = build()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            b = base.get(name)
            if b is None:
                continue
            value = b.to(device, torch.float32)
            if delta is not None:
                value = value + delta[name].to(device, torch.float32)
            t.copy_(value)
    return model.eval()
