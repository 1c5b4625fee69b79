"""Weighted means on the hypersphere of many models: ``multislerp`` and ``karcher`` (mergekit 0.1.5).

Both put each input vector on the unit sphere, average there, and rescale by the weighted mean
norm. Every quantity they need from the vectors is a dot product, and the result lies in the span
of the inputs, so the mean is found on the n×n Gram matrix (cached when the sources stay resident)
and the merge is one streaming pass ``out = Σ cᵢ·vᵢ``, instead of iterating over whole tensors.

- ``multislerp``: vᵢ are the task vectors (raw weights without a base). The tangent-space step
  mergekit takes about the normalised Euclidean mean m̂ sums to zero (Σ wᵢ(uᵢ − (uᵢ·m̂)m̂) =
  m − ‖m‖m̂), so the result is m̂ scaled by Σ wᵢ‖vᵢ‖: only float rounding (~1e-7) separates the two.
- ``karcher``: vᵢ are the raw weights of every entry, the base included, with equal weights; the
  Riemannian (Karcher) mean by mergekit's fixed-point iteration (``max_iter``, ``tol``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evo.core.errors import EvoError
from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


def gram(vectors: list[Tensor]) -> torch.Tensor:
    """vᵢ·vⱼ in float64, [n, n]."""
    n = len(vectors)
    g = torch.zeros(n, n, dtype=torch.float64)
    flat = [v.reshape(-1) for v in vectors]
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = torch.dot(flat[i], flat[j]).double()
    return g


def _combine(job: TensorJob, vectors: list[Tensor], coef: list[float], add_base: bool) -> None:
    """out = Σ cᵢ·vᵢ (+ base)."""
    if add_base:
        job.out.copy_(job.base)
    else:
        job.out.zero_()
    for v, c in zip(vectors, coef):
        job.out.add_(v, alpha=float(c))


def _raw(job: TensorJob, i: int) -> Tensor:
    """θᵢ = base + δᵢ in a scratch buffer (entry ``i``'s own weights)."""
    return torch.add(job.base, job.deltas[i], out=job.scratch.get(f"raw{i}", job.base.shape))


class MultiSlerp:
    name = "multislerp"
    params = (ParamSpec("weight", float, True), ParamSpec("normalize_weights", bool, False, True),
              ParamSpec("eps", float, False, 1e-8))
    needs_base = False
    base_entries_merge = False
    min_models = 1
    max_models = None
    random = False

    def merge(self, job: TensorJob) -> None:
        if len(job.deltas) == 1:  # nothing to interpolate: the one model's weights
            torch.add(job.base, job.deltas[0], out=job.out)
            return
        vectors = job.deltas if job.has_base else [_raw(job, i) for i in range(len(job.deltas))]
        weights = [p["weight"] for p in job.per_model]
        if job.shared["normalize_weights"]:
            total = sum(weights)
            if total == 0:
                raise EvoError(f"multislerp: the weights sum to 0 on tensor {job.name}; they cannot be normalised")
            weights = [w / total for w in weights]
        g = job.cached(("gram", job.has_base, *job.models), lambda: gram(vectors))  # sources only: reused
        coef = multislerp_coefficients(g, weights, job.shared["eps"], job.name)
        _combine(job, vectors, coef, add_base=job.has_base)


def multislerp_coefficients(g: torch.Tensor, weights: list[float], eps: float, where: str) -> list[float]:
    norms = [math.sqrt(max(g[i, i].item(), 0.0)) for i in range(len(weights))]
    a = torch.tensor([w / (n + eps) for w, n in zip(weights, norms)], dtype=torch.float64)  # m = Σ aᵢ vᵢ
    mean_norm = math.sqrt(max((a @ g @ a).item(), 0.0))
    if mean_norm < eps:
        if len(weights) == 2:  # antipodal pair: the linear interpolation, as mergekit falls back to
            return list(weights)
        raise EvoError(f"multislerp: the weighted mean of the unit vectors is zero on tensor {where} "
                       "(antipodal inputs whose weights cancel); use other weights")
    scale = sum(w * n for w, n in zip(weights, norms))
    return (a * (scale / mean_norm)).tolist()


class Karcher:
    name = "karcher"
    params = (ParamSpec("max_iter", float, False, 10.0), ParamSpec("tol", float, False, 1e-5))
    needs_base = False
    base_entries_merge = False
    min_models = 1
    max_models = None
    random = False

    def merge(self, job: TensorJob) -> None:
        # every entry, the base among them when the recipe names one, with equal weights
        vectors = ([job.base] if job.has_base else []) + [_raw(job, i) for i in range(len(job.deltas))]
        if len(vectors) == 1:
            job.out.copy_(vectors[0])
            return
        key = ("gram-raw", job.has_base, *job.models)
        g = job.cached(key, lambda: gram(vectors))
        coef = karcher_coefficients(g, int(job.shared["max_iter"]), job.shared["tol"])
        _combine(job, vectors, coef, add_base=False)


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """Coefficients cᵢ of the weighted Karcher mean Σ cᵢ vᵢ (equal weights), the iteration run on
    unit-vector coordinates: the mean is Σ kⱼ uⱼ, uⱼ = vⱼ/‖vⱼ‖, and every dot product is Û = D⁻¹GD⁻¹."""
    n = g.shape[0]
    alphas = [1.0 / n] * n
    norms = [math.sqrt(max(g[i, i].item(), 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    inv = torch.tensor([1.0 / norms[i] if norms[i] > 0 else 0.0 for i in range(n)], dtype=torch.float64)
    unit = g * inv[:, None] * inv[None, :]  # uᵢ·uⱼ
    total = sum(alphas[i] for i in valid)
    w = {i: alphas[i] / total for i in valid}
    k = torch.zeros(n, dtype=torch.float64)  # the mean, in unit-vector coordinates
    for i in valid:
        k[i] = w[i]
    norm = math.sqrt(max((k @ unit @ k).item(), 0.0))
    if norm < tol:
        k = torch.zeros(n, dtype=torch.float64)
        k[valid[0]] = 1.0
    else:
        k /= norm
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        dots = unit @ k  # uᵢ·mean
        for i in valid:
            dot = max(-1.0, min(1.0, dots[i].item()))
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = w[i] * theta / math.sin(theta)
            tangent[i] += f
            tangent -= f * dot * k
        t_norm = math.sqrt(max((tangent @ unit @ tangent).item(), 0.0))
        if t_norm < tol:
            break
        k = math.cos(t_norm) * k + math.sin(t_norm) * tangent / t_norm
        m_norm = math.sqrt(max((k @ unit @ k).item(), 0.0))
        if m_norm > tol:
            k /= m_norm
    scale = sum(a * nm for a, nm in zip(alphas, norms))
    return (k * inv * scale).tolist()
