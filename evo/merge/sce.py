"""``sce`` (Select, Calculate, Erase; FuseChat 2, arXiv 2408.07990), as mergekit 0.1.5 defines it.

    τᵢ = θᵢ − base, kept only on the ``select_topk`` fraction of entries whose variance across
    the models is largest; the TIES "sum" sign election erases entries that disagree with the
    majority; each model weighs wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) (uniform when that sum is below 1e-6);
    out = base + Σᵢ mᵢwᵢτᵢ / max(Σᵢ mᵢwᵢ, 1e-6).

The variance and the top-k use torch's own ``var``/``topk``, as mergekit does, so the selected
entries are the same; which of several entries tied exactly at the k-th variance is kept is
torch's choice in both (documented difference: none measured).
"""

from __future__ import annotations

import torch

from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec
from evo.merge.task_arithmetic import disjoint_merge, majority_sign


def select_topk_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """1 on the ``fraction`` of entries with the largest variance across models (None: keep all)."""
    if fraction >= 1:
        return None
    var = torch.var(task_vectors, dim=0, unbiased=False)
    mask = torch.zeros_like(var)
    k = int(torch.count_nonzero(var) * fraction) if fraction > 0 else 0
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce_weights(task_vectors: torch.Tensor) -> list[float]:
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = weights.sum().item()
    if abs(total) < 1e-6:
        return [1.0 / task_vectors.shape[0]] * task_vectors.shape[0]
    return (weights / total).tolist()


class Sce:
    name = "sce"
    params = (ParamSpec("select_topk", float, False, 1.0), ParamSpec("int8_mask", bool, False, False))
    needs_base = True
    base_entries_merge = False
    min_models = 1
    max_models = None
    random = False

    def merge(self, job: TensorJob) -> None:
        shape = job.base.shape
        tvs = torch.stack(list(job.deltas))
        mask = select_topk_mask(tvs, job.shared["select_topk"])
        if mask is not None:
            tvs.mul_(mask)
        weights = sce_weights(tvs)
        s = job.scratch
        sign = majority_sign(list(tvs), s.get("sce.sign", shape))
        weighted = [t.mul_(w) for t, w in zip(tvs, weights)]  # w > 0: signs unchanged
        divisor = s.get("sce.div", shape)
        merged = disjoint_merge(weighted, weights, sign, s.get("sce.acc", shape), divisor, s.get("sce.tmp", shape))
        torch.add(job.base, merged.div_(divisor.clamp_(min=1e-6)), out=job.out)
