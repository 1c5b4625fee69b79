"""``ram`` and ``ramplus_tl`` (Reinforced Agent Merging, arXiv 2601.13572), as mergekit 0.1.5
defines them.

An entry of model i counts as changed when |τᵢ| > ``epsilon`` (τᵢ = θᵢ − base). Entries only one
model changed keep that model's change; entries several changed take the mean of their changes:

    out = base + Σᵢ τᵢ·[changedᵢ]·(λᵢ·[count = 1] + [count > 1] / count)

``ram`` has λᵢ = 1. ``ramplus_tl`` boosts each model's unique changes by
λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = (its changed entries that others changed too) / (its unique
ones), counted over the tensor: a model whose edits mostly overlap others' has its few unique
edits weighed up, since the averaging already dilutes its shared ones.
"""

from __future__ import annotations

import torch

from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


class Ram:
    name = "ram"
    params = (ParamSpec("epsilon", float, False, 1e-5),)
    needs_base = True
    base_entries_merge = False
    min_models = 1
    max_models = None
    random = False
    plus = False

    def merge(self, job: TensorJob) -> None:
        eps = job.shared["epsilon"]
        changed = [d.abs() > eps for d in job.deltas]
        count = torch.stack(changed).sum(dim=0)
        unique, overlap = count == 1, count > 1
        shared = overlap / count.clamp(min=1)  # 1/count where several changed it, else 0
        job.out.copy_(job.base)
        for d, c in zip(job.deltas, changed):
            boost = self.boost(job, c, unique, overlap, eps)
            job.out.add_(d * c * (unique * boost + shared))

    def boost(self, job: TensorJob, changed, unique, overlap, eps) -> float:
        return 1.0


class RamPlusTL(Ram):
    name = "ramplus_tl"
    params = (ParamSpec("r", float, False, 0.1), ParamSpec("alpha", float, False, 0.2),
              ParamSpec("epsilon", float, False, 1e-5))

    def boost(self, job: TensorJob, changed, unique, overlap, eps) -> float:
        rho = (changed & overlap).sum().item() / max((changed & unique).sum().item(), eps)
        return 1.0 + job.shared["r"] * min(max(rho, 0.0), job.shared["alpha"])
