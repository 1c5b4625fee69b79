"""One fused pass for the task-arithmetic family (TIES, DARE, breadcrumbs, DELLA).

Eagerly, a consensus merge of n models is ~6n+6 elementwise passes over each tensor (scale,
sign election, agreement masks, weight divisor, base add), each reading and writing a whole
tensor. ``torch.compile`` (Inductor: a C++/OpenMP loop on CPU, Triton on GPU) fuses them into one
loop that reads base and each task vector once and writes the output once. Magnitude pruning
enters as two scalars per task vector, a band ``lo <= |δ| <= hi`` (TIES: ``hi`` = no limit;
breadcrumbs: the outlier cut), and DARE's and DELLA's masks as counter-hash keys (DELLA's with
the source's per-row magnitude ranks), so a pruned task vector is never materialised either. Sign-consensus methods use ``_consensus``; breadcrumbs and
dare_linear the plain ``_weighted_sum`` (plain task arithmetic stays eager: nothing to fuse).

Only resident mergers (evaluators, which merge many candidates) use it, and only for models of
at least ``FUSED_MIN_ENTRIES`` entries: compiling costs seconds once per process (4-7 s per kernel
on 2 CPU cores), more than a one-off ``evo merge`` or a small model's whole search saves.
Results match the eager path to float rounding (a fused multiply-add may round once instead of
twice). ``EVO_FUSED=0`` turns it off, ``EVO_FUSED=1`` on at any size; a machine where compiling
fails falls back to the eager path with one warning.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from evo.merge.sparsify import della_keep, keep_hash

log = logging.getLogger(__name__)

# Below this many entries per model the kernel does not pay for its compile within a search.
# `EVO_FUSED=1` vs `0 python experiments/bench_merge.py --sizes 1.6M,15M --methods ties,dare_ties
# --modes resident --reps 5 --e2e-methods ""` (3 sources, 2 cores), fused vs eager per merge,
# against ~7 s of compiling TIES' kernel and ~3-4 s for DARE's: 1.6M entries (the tiny zoo) TIES
# 53 -> 17 ms, DARE-TIES 109 -> 29 ms, i.e. 50-200 merges to pay back, more than an evaluator
# runs in the quickstart; 15M (the small zoo) 151 -> 51 ms and 604 -> 120 ms, 8-70 merges.
FUSED_MIN_ENTRIES = 8_000_000
LOADABLE = (torch.float32, torch.bfloat16, torch.float16)
NO_LIMIT = 3.0e38  # "no upper cut": a finite float, so the compiled kernel sees an ordinary scalar


def _keep(idx: Tensor, key) -> Tensor:
    """The counter-hash mask of one task vector: DARE (``key`` = (a, b, cut)) or DELLA
    ((a, b, c0m, e, m, ranks); see ``sparsify.della_key``), exactly as the eager path draws it."""
    h = keep_hash(idx, key[0], key[1])
    if len(key) == 3:
        return h < key[2]
    return della_keep(h, key[5], key[2], key[3], key[4])


def _band(x: Tensor, lo: float, hi: float, scale: float, key) -> Tensor:
    """``scale * x`` where ``lo <= |x| <= hi`` and, for DARE or DELLA (``key``), where the entry's
    counter-hash draw keeps it; 0 elsewhere."""
    a = x.abs()
    keep = (a >= lo) & (a <= hi)
    if key is not None:
        keep = keep & _keep(torch.arange(x.numel(), device=x.device, dtype=torch.int32), key)
    return torch.where(keep, x, 0.0) * scale


def _kept_l1(xs: list[Tensor], keys: list) -> Tensor:
    """‖DARE/DELLA-pruned x‖₁ of each x without the pruned tensors (the L1 rescale denominators),
    in one call per output tensor: per-call overhead is a visible share of a 25M merge."""
    idx = torch.arange(xs[0].numel(), device=xs[0].device, dtype=torch.int32)
    return torch.stack([torch.where(_keep(idx, k), x.float().abs(), 0.0).sum(dtype=torch.float64)
                        for x, k in zip(xs, keys)])


def _consensus(base: Tensor, xs: list[Tensor], lows: list[float], highs: list[float], scales: list[float],
               keys: list, weights: list[float], lam: float, normalize: bool, out: Tensor) -> None:
    base, xs = base.float(), [x.float() for x in xs]  # no-ops for float32; fused loads for 16-bit
    ys = [_band(x, lo, hi, c, k) for x, lo, hi, c, k in zip(xs, lows, highs, scales, keys)]
    total = ys[0]
    for y in ys[1:]:
        total = total + y
    sign = torch.where(total >= 0, 1.0, -1.0)                # TIES "sum" election, ties count as +
    kept = [torch.clamp(y * sign, min=0.0) for y in ys]       # agreeing entries only
    acc = kept[0]
    for k in kept[1:]:
        acc = acc + k
    merged = acc * sign
    if normalize:
        div = (kept[0] > 0) * weights[0]
        for k, w in zip(kept[1:], weights[1:]):
            div = div + (k > 0) * w
        div = torch.where(div == 0, 1.0, div)
        out.copy_(base + lam * merged / div)
    else:
        out.copy_(base + lam * merged)


def _weighted_sum(base: Tensor, xs: list[Tensor], lows: list[float], highs: list[float], scales: list[float],
                  keys: list, out: Tensor) -> None:
    base, xs = base.float(), [x.float() for x in xs]
    acc = _band(xs[0], lows[0], highs[0], scales[0], keys[0])
    for x, lo, hi, c, k in zip(xs[1:], lows[1:], highs[1:], scales[1:], keys[1:]):
        acc = acc + _band(x, lo, hi, c, k)
    out.copy_(base + acc)


class FusedKernels:
    """The compiled kernels of one merger; each call returns False (caller goes eager) if unusable."""

    def __init__(self, enabled: bool | None = None, entries: int | None = None):
        """``enabled``: True/False decides; None follows ``EVO_FUSED`` (``0``/``1``) or, unset,
        whether the model (``entries`` per source) is large enough to pay for the compile."""
        if enabled is None:
            enabled = fused_by_default(entries)
        self.enabled = bool(enabled)
        self.reason: str | None = None  # why the kernel fell back to eager, if it did
        self._fns: dict[str, object] = {}
        self.calls = {"consensus": 0, "sum": 0}  # tensors merged by each kernel (tests, profiling)

    def usable(self, *tensors: Tensor) -> bool:
        """Contiguous float tensors: 16-bit inputs are read into float32 inside the kernel and a
        16-bit output is rounded once from the float32 result (no widened copies)."""
        return self.enabled and all(t.is_contiguous() and t.dtype in LOADABLE for t in tensors)

    def __call__(self, base: Tensor, xs: list[Tensor], lows: list[float], highs: list[float], scales: list[float],
                 keys: list, weights: list[float], lam: float, normalize: bool, out: Tensor) -> bool:
        """Sign-consensus merge: ``out = base + λ Σ mᵢ cᵢ band(δᵢ) / D``; ``keys[i]`` is None or
        DARE's (a, b, cut) for task vector i."""
        return self._run("consensus", _consensus, base, xs, out, lows, highs, scales, keys,
                         [float(w) for w in weights], float(lam), bool(normalize))

    def weighted_sum(self, base: Tensor, xs: list[Tensor], lows: list[float], highs: list[float],
                     scales: list[float], keys: list, out: Tensor) -> bool:
        """Plain sum: ``out = base + Σ cᵢ band(δᵢ)`` (λ and any normaliser folded into ``scales``)."""
        return self._run("sum", _weighted_sum, base, xs, out, lows, highs, scales, keys)

    def kept_l1(self, xs: list[Tensor], keys: list) -> list[float] | None:
        """‖DARE-pruned xᵢ‖₁ for each task vector in one compiled reduction, or None (caller
        goes eager)."""
        if not self.usable(*xs):
            return None
        try:
            if "l1" not in self._fns:
                self._fns["l1"] = torch.compile(_kept_l1, dynamic=True, fullgraph=True)
            return self._fns["l1"]([x.view(-1) for x in xs], [_key_tensors(k) for k in keys]).tolist()
        except Exception as exc:
            self._disable(exc)
            return None

    def _disable(self, exc: Exception) -> None:
        self.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        log.warning("fused merge kernel unavailable (%s: %s); using the eager path",
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        self.enabled = False

    def _run(self, key, fn, base, xs, out, lows, highs, scales, keys, *rest) -> bool:
        if not self.usable(base, out, *xs):
            return False
        if key not in self._fns:
            self._fns[key] = torch.compile(fn, dynamic=True, fullgraph=True)
        floats = [[float(v) for v in seq] for seq in (lows, highs, scales)]
        keys = [None if k is None else _key_tensors(k) for k in keys]
        try:
            self._fns[key](base.view(-1), [x.view(-1) for x in xs], *floats, keys, *rest, out.view(-1))
            self.calls[key] += 1
        except Exception as exc:  # no compiler, unsupported device: the eager path still works
            self._disable(exc)
            return False
        return True


def fused_by_default(entries: int | None) -> bool:
    """``EVO_FUSED=0``/``1`` forces off/on; otherwise on for models of ``FUSED_MIN_ENTRIES``+."""
    env = os.environ.get("EVO_FUSED", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return entries is None or entries >= FUSED_MIN_ENTRIES


def _key_tensors(key) -> tuple[Tensor, ...]:
    """A mask key's integers as 0-dim int32 tensors: graph inputs, so a new seed never recompiles
    and the hash stays in 32-bit arithmetic; DELLA's ranks tensor passes flattened."""
    return tuple(v.reshape(-1) if isinstance(v, Tensor) else torch.tensor(int(v), dtype=torch.int32) for v in key)
