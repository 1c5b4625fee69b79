"""``nearswap`` (mergekit 0.1.5): move the base to the other model only where the two are already
close. w = clamp(t / |θ − base|, 0, 1) per entry (|θ − base| floored at 1e-6); out = base + w·(θ − base).
Entries closer than ``t`` take the model's value, far ones keep most of the base's.
"""

from __future__ import annotations

import torch

from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


class NearSwap:
    name = "nearswap"
    params = (ParamSpec("t", float, False),)
    needs_base = True
    base_entries_merge = False
    min_models = 1
    max_models = 1
    random = False

    def merge(self, job: TensorJob) -> None:
        delta = job.deltas[0]
        w = torch.abs(delta, out=job.scratch.get("nearswap.w", delta.shape)).clamp_(min=1e-6)
        w.reciprocal_().mul_(job.shared["t"]).clamp_(0, 1)
        torch.addcmul(job.base, w, delta, out=job.out)
