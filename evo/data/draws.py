"""Fresh search blocks every generation, and paired statistics over blocks.

A search that scores every candidate on the same few blocks learns those blocks: after a few
hundred candidates its best has the lowest loss on *them*, which is partly the blocks' noise
(issue 14 measured a 0.055-nat "gain" on 6 fixed blocks that was a 0.006-nat loss on unseen
text). So each generation draws its blocks afresh from a larger pool: candidates of one
generation share their blocks (paired comparisons, early rejection), and no recipe is tuned to
one draw.

Draws differ in difficulty by far more than candidates differ from each other, so values from
different generations are only comparable through a **control**: a fixed recipe (the uniform
average) scored on every draw. A candidate's *adjusted* value on a set is its raw value minus
the control's on the same draw plus the control's on the first draw — a paired difference,
in which block difficulty cancels, put back on one fixed scale. The optimizer, the hall of
fame and the generation table all see adjusted values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class BlockDraws:
    """Which pool blocks each generation scores: ``draw(g) -> {set: sorted indices}``.

    ``pool_sizes``: blocks per set in the pool; ``size``: blocks per set per draw; ``redraw``
    false: generation 0's draw every time. ``difficulty`` (per set, per pool block), when
    given, stratifies each draw: one block from each of ``size`` equal difficulty strata.
    """

    pool_sizes: Mapping[str, int]
    size: int
    seed: int
    redraw: bool = True
    difficulty: Mapping[str, Sequence[float]] | None = None

    def draw_id(self, generation: int) -> int:
        return generation if self.redraw else 0

    def draw(self, generation: int) -> dict[str, list[int]]:
        g = self.draw_id(generation)
        rng = np.random.default_rng([self.seed, g, 0x5EA7C4])
        out = {}
        for name in sorted(self.pool_sizes):
            n = self.pool_sizes[name]
            k = min(self.size, n)
            if self.difficulty is not None and name in self.difficulty:
                order = np.argsort(np.asarray(self.difficulty[name]), kind="stable")
                edges = np.linspace(0, n, k + 1).astype(int)
                picks = [int(order[rng.integers(lo, hi)]) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
            else:
                picks = rng.choice(n, size=k, replace=False).tolist()
            out[name] = sorted(int(i) for i in picks)
        return out


def paired_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                      sets: Sequence[str] | None = None) -> dict[str, float]:
    """Mean over sets of the mean per-block difference ``a - b`` (same blocks), its standard
    error and a normal 95% interval. Sets weigh equally, as in the mean log-perplexity."""
    names = list(sets or a)
    diffs = [np.asarray(a[s], dtype=np.float64) - np.asarray(b[s], dtype=np.float64) for s in names]
    mean = float(np.mean([d.mean() for d in diffs]))
    var = sum(float(d.var(ddof=1)) / len(d) for d in diffs if len(d) > 1)
    se = math.sqrt(var) / len(diffs)
    return {"mean": mean, "se": se, "lo": mean - Z95 * se, "hi": mean + Z95 * se,
            "blocks": int(sum(len(d) for d in diffs))}


def adjust_metrics(metrics: Mapping[str, float], control: Mapping[str, float],
                   anchor: Mapping[str, float]) -> dict[str, float]:
    """Per-set log-perplexities moved from this draw's scale to the anchor draw's:
    ``value - control(this draw) + control(anchor draw)``; other metrics (tasks) unchanged."""
    out = dict(metrics)
    for key, value in metrics.items():
        if key.startswith("logppl/") and key in control and key in anchor:
            out[key] = value - control[key] + anchor[key]
    return out


# what text a split's blocks come from (the card and `evo verify` say it beside every figure)
SPLIT_TEXT = {
    "search": "the blocks the search scored (fitted to them: not a held-out figure)",
    "valid": "the evaluation sets' blocks the search scored (not held out)",
    "selection": "documents of the evaluation sets' files held out of every search draw (the same sources as "
                 "the search: unseen documents, not a shift)",
    "test": "the zoo's test documents (test.jsonl beside each evaluation set), read by neither the search nor "
            "the selection; drawn from the same sources as the evaluation sets",
}
