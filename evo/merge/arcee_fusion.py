"""``arcee_fusion`` (mergekit 0.1.5): take the other model's value only where its change matters
most. importance = |θ − base| · KL(softmax(θ) ‖ softmax(base)) (per row, last axis; each softmax
+1e-8); the change is kept where importance ≥ median + 1.5·IQR (an outlier fence), else the base.

Quantiles are read from the sorted scores at index ⌊q·(n−1)⌋, as mergekit does. For tensors over
a million entries mergekit sorts a random sample (with replacement, from torch's global RNG) to
estimate them; evo sorts them all, so its fence is exact and reproducible (documented difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * kl


def outlier_fence(scores: torch.Tensor) -> torch.Tensor:
    ordered = torch.sort(scores.reshape(-1)).values
    at = lambda q: ordered[int(q * (ordered.numel() - 1))]  # noqa: E731
    return at(0.5) + 1.5 * (at(0.75) - at(0.25))


class ArceeFusion:
    name = "arcee_fusion"
    params: tuple[ParamSpec, ...] = ()
    needs_base = True
    base_entries_merge = False
    min_models = 1
    max_models = 1
    random = False

    def merge(self, job: TensorJob) -> None:
        delta = job.deltas[0]
        model = torch.add(job.base, delta, out=job.scratch.get("fusion.model", delta.shape))
        importance = fusion_importance(model, job.base)
        keep = importance >= outlier_fence(importance)
        torch.addcmul(job.base, delta, keep, out=job.out)
