"""``model_stock`` (Jang et al. 2024, as mergekit defines it): interpolate between the base and the
mean of the fine-tuned models by t = N·cos / (1 + (N−1)·cos), cos the mean pairwise cosine of
the task vectors (per row when ``filter_wise``).

The cosines depend only on the resident sources, so they are computed once and cached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


def _rows(x: Tensor, filter_wise: bool) -> Tensor:
    if not filter_wise:
        return x.reshape(1, -1)
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1])


def stock_ratio(deltas: list[Tensor], filter_wise: bool) -> Tensor:
    """t per row (a single row unless ``filter_wise``), shape [rows, 1]."""
    rows = [_rows(d, filter_wise) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=1) for r in rows]
    cos = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            dot = torch.linalg.vecdot(rows[i], rows[j], dim=1)
            cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0)
    n = len(rows)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6  # no finite estimate: keep the base there (mergekit does too)
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    return t.unsqueeze(1)


class ModelStock:
    name = "model_stock"
    params = (ParamSpec("filter_wise", bool, False, False),)
    needs_base = True
    base_entries_merge = False
    min_models = 2
    max_models = None
    random = False

    def merge(self, job: TensorJob) -> None:
        fw = job.shared["filter_wise"]
        t = job.cached(("model_stock", fw, *job.models), lambda: stock_ratio(job.deltas, fw))
        n = len(job.deltas)
        out = job.out.copy_(job.base)
        if t.numel() == 1:
            for d in job.deltas:
                out.add_(d, alpha=t.item() / n)
            return
        rows, scale = _rows(out, fw), t / n
        for d in job.deltas:
            rows.addcmul_(_rows(d, fw), scale)
