"""One fused pass for the sign-consensus merges (TIES, DARE-TIES, breadcrumbs-TIES, DELLA).

Eagerly, a consensus merge of n models is ~6n+6 elementwise passes over each tensor (scale,
sign election, agreement masks, weight divisor, base add), each reading and writing a whole
tensor. ``torch.compile`` (Inductor: a C++/OpenMP loop on CPU, Triton on GPU) fuses them into one
loop that reads base and each task vector once and writes the output once. The magnitude
threshold enters as a scalar (``|δ| >= t``, what ``sparsify.magnitude_prune`` keeps), so a
magnitude-pruned task vector is never materialised either.

Only resident mergers (evaluators, which merge thousands of candidates) use it: compiling costs
seconds once per process, more than a one-off ``evo merge`` saves. Results match the eager path
to float rounding (a fused multiply-add may round once instead of twice). ``EVO_FUSED=0`` turns
it off; a machine where compiling fails falls back to the eager path with one warning.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def _consensus(base: Tensor, xs: list[Tensor], thresholds: list[float], scales: list[float],
               weights: list[float], lam: float, normalize: bool, out: Tensor) -> None:
    ys = [torch.where(x.abs() >= t, x, 0.0) * c for x, t, c in zip(xs, thresholds, scales)]
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


class FusedConsensus:
    """Holds the compiled kernel of one merger; falls back to eager (returns False) if unusable."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = os.environ.get("EVO_FUSED", "1") != "0"
        self.enabled = enabled
        self._fn = None

    def __call__(self, base: Tensor, xs: list[Tensor], thresholds: list[float], scales: list[float],
                 weights: list[float], lam: float, normalize: bool, out: Tensor) -> bool:
        if not self.enabled or not all(t.is_contiguous() for t in (base, out, *xs)) \
                or any(t.dtype != torch.float32 for t in (base, out, *xs)):
            return False
        if self._fn is None:
            self._fn = torch.compile(_consensus, dynamic=True, fullgraph=True)
        flat = [x.view(-1) for x in xs]
        try:
            self._fn(base.view(-1), flat, [float(t) for t in thresholds], [float(c) for c in scales],
                     [float(w) for w in weights], float(lam), bool(normalize), out.view(-1))
        except Exception as exc:  # no compiler, unsupported device: the eager path still works
            log.warning("fused merge kernel unavailable (%s: %s); using the eager path",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.enabled = False
            return False
        return True
