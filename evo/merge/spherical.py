"""Spherical interpolation between two models: ``slerp`` (base → other) and ``nuslerp``.

Both reduce to out = a·v0 + b·v1 with scalar (or per-slice) coefficients that depend only on
norms and dot products of the resident sources, so those are computed once and cached, and a
merge is one streaming pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float,
                       dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float]:
    """(a, b) with slerp(t; v0, v1) = a·v0 + b·v1, from ‖v0‖, ‖v1‖ and v0·v1 (mergekit ``slerp``:
    norms under ``eps`` count as 1, nearly colinear vectors interpolate linearly)."""
    n0 = norm0 if norm0 > eps else 1.0
    n1 = norm1 if norm1 > eps else 1.0
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def _dots(x: Tensor, y: Tensor) -> float:
    return torch.dot(x.reshape(-1), y.reshape(-1)).item()


class Slerp:
    name = "slerp"
    params = (ParamSpec("t", float, False),)
    needs_base = True
    base_entries_merge = False
    min_models = 1
    max_models = 1
    random = False

    def merge(self, job: TensorJob) -> None:
        # v0 = base, v1 = base + δ: ‖v1‖² and v0·v1 expand into cached base·base, base·δ, δ·δ.
        base, delta = job.base, job.deltas[0]
        bb = job.cached(("bb",), lambda: _dots(base, base))
        bd = job.cached(("bd", job.models[0]), lambda: _dots(base, delta))
        dd = job.cached(("dd", job.models[0]), lambda: _dots(delta, delta))
        a, b = slerp_coefficients(job.shared["t"], math.sqrt(bb), math.sqrt(max(bb + 2 * bd + dd, 0.0)), bb + bd)
        torch.mul(base, a + b, out=job.out)
        job.out.add_(delta, alpha=b)


class NuSlerp:
    """mergekit ``nuslerp``: t = w₂/(w₁+w₂) (0.5 when the sum is ~0); on task vectors when a base
    is given, on the raw weights otherwise; whole-tensor by default, else per row/column."""

    name = "nuslerp"
    params = (ParamSpec("weight", float, True), ParamSpec("nuslerp_flatten", bool, False, True),
              ParamSpec("nuslerp_row_wise", bool, False, False))
    needs_base = False
    base_entries_merge = False
    min_models = 2
    max_models = 2
    random = False

    def merge(self, job: TensorJob) -> None:
        w0, w1 = (p["weight"] for p in job.per_model)
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total
        base, d0, d1 = job.base, job.deltas[0], job.deltas[1]
        if job.has_base:
            v0, v1 = d0, d1
        else:
            v0 = torch.add(base, d0, out=job.scratch.get("v0", base.shape))
            v1 = torch.add(base, d1, out=job.scratch.get("v1", base.shape))
        flatten = job.shared["nuslerp_flatten"] or base.dim() < 2
        dim = None if flatten else (0 if job.shared["nuslerp_row_wise"] else -1)
        stats = lambda: _slice_stats(v0, v1, dim)  # noqa: E731
        n0, n1, dot = job.cached(("nuslerp", dim, *job.models), stats) if job.has_base else stats()
        n0, n1 = n0.clamp(min=1e-7), n1.clamp(min=1e-7)
        cos = (dot / (n0 * n1)).clamp(-1, 1)
        colinear = (1 - cos * cos) <= 1e-16
        theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
        sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
        a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
        b = torch.where(colinear, torch.full_like(theta, t), torch.sin(t * theta) / sin)
        if dim is None:
            a, b = a.item(), b.item()
            torch.mul(base, 1.0 if job.has_base else a + b, out=job.out)
            job.out.add_(d0, alpha=a).add_(d1, alpha=b)
            return
        if job.has_base:
            job.out.copy_(base)
        else:
            torch.mul(base, a + b, out=job.out)
        job.out.addcmul_(d0, a).addcmul_(d1, b)


def _slice_stats(v0: Tensor, v1: Tensor, dim):
    if dim is None:
        return (torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1),
                torch.dot(v0.reshape(-1), v1.reshape(-1)))
    return (torch.linalg.vector_norm(v0, dim=dim, keepdim=True), torch.linalg.vector_norm(v1, dim=dim, keepdim=True),
            torch.linalg.vecdot(v0, v1, dim=dim).unsqueeze(dim))
