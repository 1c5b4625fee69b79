"""Cheaper fitness: score candidates on a representative subset of the evaluation blocks.

The subset is chosen once per data version, before the search, from the blocks' *difficulty*:
the mean per-block NLL of the base and every source model. Blocks are taken at evenly spaced
difficulty quantiles of each set, so the subset keeps the spread of easy and hard text that
decides how merges rank (``experiments/bench_search.py`` measures the rank correlation of
subset and full scores: Spearman 0.98-0.998 at 25% of the blocks on the tiny zoo).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


def quantile_pick(difficulty: np.ndarray, fraction: float) -> list[int]:
    """Indices of ``round(fraction * n)`` blocks at evenly spaced difficulty quantiles."""
    n = len(difficulty)
    k = max(1, min(n, round(fraction * n)))
    order = np.argsort(difficulty, kind="stable")
    return sorted(int(order[int((i + 0.5) * n / k)]) for i in range(k))


def block_difficulty(base: Mapping[str, np.ndarray], deltas: Mapping[str, Mapping[str, np.ndarray]],
                     model_config: dict, sets: Mapping[str, np.ndarray], batch_size: int = 8) -> dict[str, np.ndarray]:
    """Mean NLL of every block over the base model and each source model (base + its task vector)."""
    from evo.scoring.evaluator import build_model
    from evo.core.tensors import float32_array
    from evo.scoring.fitness import block_nlls

    model = build_model(model_config)
    params = model.state_dict()
    blocks = {name: torch.from_numpy(np.asarray(b, dtype=np.int64)) for name, b in sets.items()}
    totals = {name: np.zeros(len(b)) for name, b in sets.items()}
    sources = [None, *deltas]
    with torch.no_grad():
        for source in sources:
            for name, value in base.items():
                t = torch.from_numpy(float32_array(np.asarray(value)))
                if source is not None:
                    t = t + torch.from_numpy(float32_array(np.asarray(deltas[source][name])))
                params[name].copy_(t)
            for name, b in blocks.items():
                totals[name] += block_nlls(model, b, batch_size).numpy()
    return {name: t / len(sources) for name, t in totals.items()}


def choose_subset(base, deltas, model_config, sets: Mapping[str, np.ndarray], fraction: float,
                  batch_size: int = 8) -> dict[str, list[int]]:
    """Per set, the indices of the blocks the search scores candidates on."""
    difficulty = block_difficulty(base, deltas, model_config, sets, batch_size)
    return {name: quantile_pick(d, fraction) for name, d in difficulty.items()}
