"""Resident merging: base + task vectors stay in memory; each candidate recipe is merged into the
same preallocated output buffers.

Re-reading models per candidate (mergekit-evolve's on-disk mode) or allocating outputs per merge
costs 10–50× more on the target VMs, where fresh memory is first touched at <1 GB/s.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import torch
from torch import Tensor

from evo.core.errors import EvoError
from evo.merge.config import MergeConfig, ModelEntry
from evo.merge.method import Scratch, TensorJob
from evo.merge.params import layer_t, resolve
from evo.merge.registry import METHODS


def task_vectors(base: Mapping[str, Tensor], models: Mapping[str, Mapping[str, Tensor]],
                 dtype: Optional[torch.dtype] = None) -> dict[str, dict[str, Tensor]]:
    """δᵢ = θᵢ − θ_base per tensor (see :func:`task_vector`), for every model."""
    return {model: task_vector(base, sd, model, dtype) for model, sd in models.items()}


def task_vector(base: Mapping[str, Tensor], sd: dict[str, Tensor], model: str,
                dtype: Optional[torch.dtype] = None, *, consume: bool = False) -> dict[str, Tensor]:
    """δ = θ − θ_base per tensor, computed in float32 and rounded once into ``dtype`` (default:
    the base's dtype); non-float tensors (e.g. integer buffers) keep the base's dtype.
    ``consume``: pop each tensor of ``sd`` as it is used, so a whole model is freed tensor by
    tensor (the caller's dict is emptied).

    Raises EvoError naming the model and tensor when names or shapes differ from the base.
    """
    check_same_tensors(base, sd, model)
    out = {}
    for name, b in base.items():
        t = sd.pop(name) if consume else sd[name]
        if b.dtype.is_floating_point:
            out[name] = (t.float() - b.float()).to(dtype or b.dtype)
        else:
            out[name] = t.to(b.dtype) - b
    return out


def check_same_tensors(base: Mapping[str, Tensor], sd: Mapping[str, Tensor], model: str) -> None:
    for name, t in base.items():
        if name not in sd:
            raise EvoError(f"model '{model}': tensor {name} is missing (present in the base)")
        if tuple(sd[name].shape) != tuple(t.shape):
            raise EvoError(f"model '{model}': tensor {name} has shape {tuple(sd[name].shape)}, "
                           f"the base has {tuple(t.shape)}")
    for name in sd:
        if name not in base:
            raise EvoError(f"model '{model}': tensor {name} is not in the base model")


def tensor_seed(seed: int, tensor: str, model: str) -> int:
    """Seed for one (tensor, model) draw: independent of tensor order and of the other models."""
    h = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class Merger:
    """Models stay resident: base + task vectors, merged per candidate into preallocated, reused
    output buffers.

    Args:
        resident: the sources serve many merges (an evaluator): build per-source magnitude
            tables (``sparsify.MagnitudeTable``) and use the fused consensus kernel.
        fused: compile the fused kernel (resident only); None decides by model size and
            ``EVO_FUSED`` (``evo.merge.fused.fused_by_default``).
        base: base-model tensors. Never written to (they may be read-only object-store views).
        deltas: model name -> task vector (same names/shapes as ``base``). Never written to.
        num_layers: the model's layer count, for per-layer ("gradient") parameter values.
        out: destination buffers, e.g. a live HF model's ``state_dict()``; names absent from
            ``base`` (a tied lm_head) are left alone. Allocated once when None.
        device: where the outputs live and the arithmetic runs; base/deltas are moved there once,
            unless ``stream_sources``.
        stream_sources: leave base and task vectors where they are (host memory: the object
            store's pages) and copy each tensor to ``device`` as it is merged, into reused buffers;
            for a GPU too small to hold every source beside the model (``evo.cluster.memory`` decides).
        largest: size the scratch buffers for tensors of this many entries (a streaming merger,
            created with empty ``base``/``deltas``, knows it from the file headers).
    """

    def __init__(self, base: Mapping[str, Tensor], deltas: Mapping[str, Mapping[str, Tensor]], *,
                 num_layers: int, out: Optional[Mapping[str, Tensor]] = None, device="cpu",
                 resident: bool = False, largest: Optional[int] = None, fused: Optional[bool] = None,
                 stream_sources: bool = False):
        self.device = torch.device(device)
        self.num_layers = int(num_layers)
        self.stream_sources = stream_sources
        self._home = (lambda t: t) if stream_sources else (lambda t: t.to(self.device))
        self.base = {n: self._home(t) for n, t in base.items()}
        self.deltas = {}
        for model, sd in deltas.items():
            check_same_tensors(self.base, sd, model)
            self.deltas[model] = {n: self._home(sd[n]) for n in self.base}
        if out is None:
            # zero_() touches the pages now, so the first merge is not the slow one
            self.out = {n: torch.empty_like(t, device=self.device).zero_() for n, t in self.base.items()}
        else:
            self.out = {}
            for n, t in self.base.items():
                if n not in out:
                    raise EvoError(f"output buffers: tensor {n} is missing")
                if tuple(out[n].shape) != tuple(t.shape):
                    raise EvoError(f"output buffers: tensor {n} has shape {tuple(out[n].shape)}, "
                                   f"the sources have {tuple(t.shape)}")
                if out[n].device.type != self.device.type:
                    raise EvoError(f"output buffers: tensor {n} is on {out[n].device}, merging on {self.device}")
                self.out[n] = out[n]
        largest = largest or max((t.numel() for t in self.base.values()), default=1)
        self.scratch = Scratch(largest, self.device)
        self._t = {n: layer_t(n, self.num_layers) for n in self.base}
        self._cache: dict = {}  # statistics of the fixed sources (norms, dots), reused across merges
        # resident: many merges over the same sources (an evaluator), so per-source magnitude
        # tables and a compiled consensus kernel pay for themselves; a one-off merge skips both
        self.resident = resident
        self.fused = None
        if resident:
            from evo.merge.fused import FusedKernels

            self.fused = FusedKernels(fused, entries=sum(t.numel() for t in self.base.values()))

    def set_delta(self, model: str, delta: Mapping[str, Tensor]) -> None:
        """Add or replace one source's task vector (the continual loop's current release)."""
        check_same_tensors(self.base, delta, model)
        self.deltas[model] = {n: self._home(delta[n]) for n in self.base}
        self._cache.clear()  # cached norms and dot products may involve the old vector

    def merge(self, config: MergeConfig, seed: int = 0) -> dict[str, Tensor]:
        """Merge ``config`` into the output buffers and return them (the same objects every call).

        ``config.models[i].model`` names a key of ``deltas``; an entry naming ``config.base_model``
        is the base itself. Random methods are reproducible for a given ``seed``.
        """
        plan = self.plan(config, self.deltas)
        with torch.no_grad():
            for name, base in self.base.items():
                self.merge_tensor(plan, name, base, {m: d[name] for m, d in self.deltas.items()},
                                  self.out[name], seed)
        return self.out

    def plan(self, config: MergeConfig, available) -> "MergePlan":
        """Check ``config`` against the loaded (or, streaming, the available) models once."""
        method = METHODS.get(config.merge_method)
        if method is None:
            raise EvoError(f"unknown merge_method '{config.merge_method}'")
        entries: list[tuple[ModelEntry, bool]] = []  # (entry, has a task vector)
        for e in config.models:
            if config.base_model is not None and e.model == config.base_model:
                if method.base_entries_merge:
                    entries.append((e, False))
                continue
            if e.model not in available:
                raise EvoError(f"model '{e.model}' is not loaded in this Merger "
                               f"(loaded: {', '.join(sorted(available)) or 'none'})")
            entries.append((e, True))
        if (method.base_entries_merge and config.base_model is not None
                and all(e.model != config.base_model for e in config.models)):
            # mergekit makes a named base an input of linear too (weight from the global parameters)
            entries.insert(0, (ModelEntry(config.base_model, {}), False))
        if len(entries) < method.min_models or (method.max_models and len(entries) > method.max_models):
            raise EvoError(f"merge_method '{method.name}': wrong number of models ({len(entries)})")
        return MergePlan(config, method, entries)

    def merge_tensor(self, plan: "MergePlan", name: str, base: Tensor, deltas: Mapping[str, Tensor],
                     out: Tensor, seed: int = 0) -> Tensor:
        """Merge one tensor: ``base`` and each model's task vector ``deltas[model]`` into ``out``.
        The resident ``merge`` calls it per tensor; a streaming merge (``merge_to_dir``) calls it
        with tensors it reads one at a time, so no model is ever held whole."""
        config, method = plan.config, plan.method
        where = f"merge_method '{method.name}'"
        t = self._t.get(name)
        if t is None:
            t = self._t[name] = layer_t(name, self.num_layers)
        shared = {p.name: resolve(p, [config.parameters], name, t, where) for p in plan.shared_specs}
        per_model = [{p.name: resolve(p, [e.parameters, config.parameters], name, t,
                                      f"{where}, model '{e.model}'") for p in plan.model_specs}
                     for e, _ in plan.entries]
        models = [e.model for e, _ in plan.entries]
        used = [e.model for e, has in plan.entries if has]
        if self.stream_sources:  # this tensor's inputs onto the device
            base, deltas = self._fetch(base, deltas, used)
        # sources stored in bf16/fp16: the arithmetic is float32. A method that reads 16-bit inputs
        # into float32 itself (widens_lazily: the fused kernels, plain task arithmetic) is handed
        # them as stored and calls job.widen() only before a path that needs float32 copies
        lazy = base.dtype != torch.float32 and getattr(method, "widens_lazily", False)
        if base.dtype != torch.float32 and not lazy:
            base, deltas = self._widen(base, deltas, used)
        direct = out.dtype == base.dtype == torch.float32
        target = out if direct else self.scratch.get("result", base.shape, torch.float32)
        job = TensorJob(
            name=name, out=target, base=base,
            deltas=[deltas[e.model] if has_delta else None for e, has_delta in plan.entries],
            shared=shared, per_model=per_model, scratch=self.scratch,
            generator=self._generators(seed, name, models),
            seed=lambda i: tensor_seed(seed, name, models[i]),
            models=models, has_base=config.base_model is not None,
            cache=self._cache, resident=self.resident, fused=self.fused,
        )
        if lazy:
            def widen() -> None:
                wide, wd = self._widen(base, deltas, used)
                job.base = wide
                job.deltas = [wd[e.model] if has_delta else None for e, has_delta in plan.entries]
            job.widen = widen
        with torch.no_grad():
            method.merge(job)
            if not direct:
                out.copy_(target)
        return out

    def _fetch(self, base: Tensor, deltas: Mapping[str, Tensor], used: list[str]):
        """Device copies of one tensor's base and the task vectors this merge uses, in reused
        buffers (``sources + 1`` x the largest tensor, in the stored dtype). A pageable host
        tensor is staged through pinned memory by the CUDA driver; pinning the sources instead
        would take a private host copy of all of them per evaluator."""
        dev = self.scratch.get("stream.base", base.shape, base.dtype).copy_(base)
        out = {m: self.scratch.get(f"stream.{i}", deltas[m].shape, deltas[m].dtype).copy_(deltas[m])
               for i, m in enumerate(used)}
        return dev, out

    def _widen(self, base: Tensor, deltas: Mapping[str, Tensor], used: list[str]):
        """float32 copies of a low-precision base and of the task vectors this merge uses, in
        reused scratch buffers (one per source: ``(sources + 1) x`` the largest tensor)."""
        wide = self.scratch.get("widen.base", base.shape).copy_(base)
        out = {}
        for i, m in enumerate(used):
            d = deltas[m]
            out[m] = d if d.dtype == torch.float32 else self.scratch.get(f"widen.{i}", d.shape).copy_(d)
        return wide, out

    def _generators(self, seed: int, name: str, models: list[str]):
        def generator(i: int) -> torch.Generator:
            return torch.Generator(device=self.device).manual_seed(tensor_seed(seed, name, models[i]))
        return generator


class MergePlan:
    """A recipe checked once against the available models: its method and participating entries."""

    def __init__(self, config: MergeConfig, method, entries):
        self.config, self.method, self.entries = config, method, entries
        self.shared_specs = [p for p in method.params if not p.per_model]
        self.model_specs = [p for p in method.params if p.per_model]
