"""``linear``: Σ wᵢ θᵢ, divided by Σ wᵢ when ``normalize`` (default true)."""

from __future__ import annotations

import torch

from evo.core.errors import EvoError
from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


class Linear:
    name = "linear"
    params = (ParamSpec("weight", float, True), ParamSpec("normalize", bool, False, True))
    needs_base = False
    base_entries_merge = True
    min_models = 1
    max_models = None
    random = False

    def merge(self, job: TensorJob) -> None:
        # θᵢ = base + δᵢ, so Σ wᵢθᵢ / D = (Σwᵢ/D)·base + Σ (wᵢ/D)·δᵢ: one streaming pass per source.
        weights = [p["weight"] for p in job.per_model]
        total = sum(weights)
        div = 1.0
        if job.shared["normalize"]:
            if total == 0:
                raise EvoError(f"linear: weights sum to 0 for tensor {job.name} with normalize: true")
            div = total
        torch.mul(job.base, total / div, out=job.out)
        for w, d in zip(weights, job.deltas):
            if d is not None and w != 0:
                job.out.add_(d, alpha=w / div)
