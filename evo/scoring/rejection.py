"""Early rejection, in one place: stop scoring a candidate once it is clearly worse than the
current k-th best (configured by ``evo.core.config.EarlyRejection``).

* :func:`active` says whether it applies (one objective, a mean log-perplexity to minimise);
* :func:`kth_best` is the loop's side: the k-th best of the optimizer's population as a
  :class:`Threshold` (with its per-block NLLs when known, for a paired test);
* :meth:`Threshold.on_draw` moves a threshold onto another block draw through the control;
* :class:`RejectionTest` is the evaluator's side: after each chunk of blocks, the verdict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


@dataclass(frozen=True)
class Threshold:
    """The mean log-perplexity a candidate must beat, and the reference's per-block NLLs on the
    blocks the candidate is scored on (``None``: only the value is known, an unpaired bound)."""

    value: float
    blocks: Mapping[str, list[float]] | None = None

    @property
    def paired(self) -> bool:
        return self.blocks is not None

    def on_draw(self, control_adjusted: float, control_now: float,
                control_blocks: Mapping[str, list[float]] | None, paired: bool) -> "Threshold":
        """This threshold (a k-th best on the control-adjusted scale, where the control scores
        ``control_adjusted``) on a draw where the control scores ``control_now``: its expected
        per-block NLLs are the control's plus the k-th best's lead over the control (``evo.data.draws``)."""
        shift = self.value - control_adjusted
        if not paired or not control_blocks:
            return Threshold(control_now + shift)
        return Threshold(control_now + shift, {s: [x + shift for x in v] for s, v in control_blocks.items()})


def active(cfg) -> bool:
    """On by default, but only where it is sound: one objective, and it is a mean log-perplexity."""
    er = cfg.eval.early_rejection
    return er.enabled and len(cfg.objectives) == 1 and cfg.objectives[0].metric == "logppl" \
        and cfg.objectives[0].reduce == "mean" and cfg.objectives[0].goal == "minimize"


def kth_best(cfg, optimizer, lookup: Callable[[list[float]], dict | None] | None = None) -> Threshold | None:
    """The current k-th best of the population, when early rejection applies: with its per-block
    scores for a paired test where ``lookup(genome)`` finds its cached result."""
    if not active(cfg):
        return None
    ranked = sorted((e for e in optimizer.population if e.values is not None and math.isfinite(e.values[0])),
                    key=lambda e: e.values[0])
    k = cfg.eval.early_rejection.k
    if len(ranked) < k:
        return None
    kth = ranked[k - 1]
    result = lookup(kth.genome) if lookup is not None else None
    if cfg.eval.early_rejection.paired and result and result.get("status") == "ok" and result.get("block_nlls"):
        return Threshold(kth.values[0], result["block_nlls"])
    return Threshold(kth.values[0])


@dataclass(frozen=True)
class RejectionTest:
    """The evaluator's test: perplexity in ``chunks`` prefixes of every set; after each, reject
    when the lower ``z``-standard-error bound of the gap to the threshold exceeds ``margin``."""

    chunks: int = 4
    z: float = 3.0
    margin: float = 0.0

    @classmethod
    def of(cls, er) -> "RejectionTest":
        return cls(chunks=er.chunks, z=er.z, margin=er.margin)

    def verdict(self, done: Mapping[str, torch.Tensor], threshold: Threshold) -> dict[str, float] | None:
        """The candidate's estimated metrics if it is rejected on the blocks scored so far
        (``done``: per-block NLLs by set), else None."""
        if threshold.paired:
            # paired: the difference to the reference on the blocks seen so far (chunks are
            # prefixes, so those are the reference's first len(v) blocks)
            ref = {n: torch.as_tensor(threshold.blocks[n], dtype=torch.float64) for n in done}
            diff = {n: v - ref[n][: len(v)] for n, v in done.items()}
            delta = sum(float(d.mean()) for d in diff.values()) / len(diff)
            se = math.sqrt(sum(float(d.var()) / len(d) for d in diff.values() if len(d) > 1)) / len(diff)
            if delta - self.z * se > self.margin:
                # the estimate of the full score: the reference's mean plus the mean difference
                return {f"logppl/{n}": float(ref[n].mean()) + float(d.mean()) for n, d in diff.items()}
            return None
        metrics = {f"logppl/{n}": float(v.mean()) for n, v in done.items()}
        mean = sum(metrics.values()) / len(metrics)
        # standard error of the mean over sets, from the spread over blocks within each set
        se = math.sqrt(sum(float(v.var()) / len(v) for v in done.values() if len(v) > 1)) / len(done)
        return metrics if mean - self.z * se > threshold.value + self.margin else None

    def usable(self, threshold: Threshold, sets: Mapping[str, torch.Tensor]) -> Threshold:
        """``threshold``, unpaired when its reference was measured on other blocks."""
        if threshold.paired and any(len(threshold.blocks.get(n, ())) != len(b) for n, b in sets.items()):
            return Threshold(threshold.value)
        return threshold
