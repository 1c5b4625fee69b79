"""Held-out perplexity of a causal LM, batched, in inference mode.

Evaluation text is cut into fixed-length token blocks once (per data version); scoring a
candidate is then a few batched forward passes over those blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EvalSet:
    """Token blocks of one evaluation domain: ``blocks`` is an int64 tensor [n, seq_len]."""

    name: str
    blocks: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.blocks.numel())


@torch.inference_mode()
def mean_nll(model, blocks: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu") -> float:
    """Mean next-token negative log-likelihood (nats/token) of ``model`` over ``blocks``.

    exp(mean_nll) is the perplexity; log-perplexity is mean_nll itself. Returns ``nan`` if the
    model produces non-finite logits, so callers can record the candidate as failed.
    """
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(nll)
        count += target.numel()
    return total / count if count else math.nan


def log_perplexities(model, eval_sets: Sequence[EvalSet], batch_size: int = 8, device="cpu") -> dict[str, float]:
    """Log-perplexity (mean NLL) of ``model`` on every evaluation set, keyed by set name."""
    return {s.name: mean_nll(model, s.blocks, batch_size=batch_size, device=device) for s in eval_sets}


def objective_values(metrics: dict[str, float], objectives, set_names: Sequence[str], task_names: Sequence[str] = ()) -> list[float]:
    """Reduce per-set metrics (``logppl/<set>``, ``task/<task>``) to the declared objective vector."""
    out = []
    for obj in objectives:
        names = obj.sets or (set_names if obj.metric == "logppl" else task_names)
        values = []
        for s in names:
            key = f"{obj.metric}/{s}"
            if key in metrics:
                values.append(metrics[key])
            else:  # a group of strata ("replay" = mean over "replay:<stratum>", each weighted equally)
                parts = [v for k, v in metrics.items() if k.startswith(key + ":")]
                if not parts:
                    raise KeyError(key)
                values.append(sum(parts) / len(parts))
        if obj.reduce == "mean":
            out.append(sum(values) / len(values))
        elif obj.reduce == "max":
            out.append(max(values))
        else:
            out.append(sum(values))
    return out


def block_nlls(model, blocks: torch.Tensor, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """Mean NLL of each block separately (float64 [n]): the unit of chunked early rejection."""
    out = []
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(dim=1)
            out.append(nll.double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
