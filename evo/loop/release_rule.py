"""The continual loop's release rule: which candidate of a data version, if any, ships.

Pure (no Ray, no files), so the rule is tested on hand-made candidates. The loop gathers the
candidates evaluated on the version and the current release re-measured on the same blocks
(the *reference*), and exports what :func:`decide` picks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evo.core.config import ExperimentConfig


@dataclass
class Decision:
    """What the rule decided for one data version."""

    rule: str
    decision: str
    candidate: dict | None = None       # the best candidate by the rule (also when not released)
    release: bool = False               # export ``candidate``
    # retention lost since each guarded key's anchor once ``candidate`` ships (anchored guard)
    drift: dict[str, float] = field(default_factory=dict)


def decide(cfg: ExperimentConfig, candidates: list[dict], reference_values: list[float] | None,
           reference_metrics: dict, *, first: bool, drift: dict[str, float] | None = None) -> Decision:
    """Apply ``cfg.release`` to the version's candidates.

    Args:
        candidates: successful, non-reference candidates of this version (``values``,
            ``metrics`` with ``logppl/replay:<stratum>`` per older stratum, ``candidate``).
        reference_values, reference_metrics: the current release (the base before the first)
            on the same blocks.
        first: nothing has shipped yet: the best weighted sum of the objectives, if it beats the base's.
        drift: retention already lost per guarded key since its anchor (anchored guard).

    Later releases: the best ``release.objective`` among candidates whose retention, on every
    older stratum separately when the retention objective is the replay mean, is within
    ``release.tolerance`` of the anchor (``guard: anchored``: the drift so far plus this step's
    loss, both paired against a release on the same blocks) or of the current release
    (``guard: current``), improving the objective by more than ``release.min_improvement``.
    """
    rel = cfg.release
    objective, retention = cfg.release_objectives()
    names = [o.name for o in cfg.objectives]
    oi = names.index(objective)
    ri = names.index(retention) if retention else None
    sign = {o.name: (1.0 if o.goal == "minimize" else -1.0) for o in cfg.objectives}
    weights = [o.weight * sign[o.name] for o in cfg.objectives]
    ref, ref_metrics = reference_values, reference_metrics or {}
    strata = sorted(k for k in ref_metrics if k.startswith("logppl/replay:"))
    per_stratum = bool(strata) and retention is not None and \
        next(o for o in cfg.objectives if o.name == retention).sets == ["replay"]
    anchored = rel.guard == "anchored"
    drift = dict(drift or {}) if anchored else {}
    # release.first: "guarded" holds the first release to the same rule, the base being every
    # prior stratum's anchor; "weighted" takes the best weighted sum (nothing shipped to guard)
    weighted_first = first and rel.first == "weighted"
    guarded = not weighted_first and ri is not None and ref is not None

    def losses(c) -> dict[str, float]:
        """Retention lost against the current release per guarded key (positive: worse)."""
        if per_stratum:
            return {k: c["metrics"][k] - ref_metrics[k] for k in strata}
        return {retention: sign[retention] * (c["values"][ri] - ref[ri])}

    def weighted(values) -> float:  # lower is better
        return float(np.dot(weights, values))

    if guarded:
        what = "log-perplexity on every older version (and the prior)" if per_stratum else retention
        against = ("its anchor (the release current when it was first guarded; losses summed over releases)"
                   if anchored else "the current release's")
        rule = (f"best {objective} among candidates whose {what} is within {rel.tolerance} of {against}, "
                f"improving {objective} by more than {rel.min_improvement}")
    elif weighted_first:
        rule = ("first release: best weighted sum of the objectives ("
                + " + ".join(f"{o.weight:g}·{o.name}" for o in cfg.objectives)
                + f"), improving on the base's by more than {rel.min_improvement}")
    else:
        rule = f"best {objective}, improving on the current release's by more than {rel.min_improvement}"

    best, best_loss = None, np.inf
    for c in candidates:
        if weighted_first:  # nothing shipped to guard against: the best trade-off by the declared weights
            loss = weighted(c["values"])
        else:
            if guarded and max(drift.get(k, 0.0) + d for k, d in losses(c).items()) > rel.tolerance:
                continue  # forgets too much against the anchor (or the current release)
            loss = sign[objective] * c["values"][oi]
        if loss < best_loss:
            best, best_loss = c, loss

    out = Decision(rule=rule, decision="", candidate=best, drift=drift)
    if best is None:
        out.decision = "no candidate passed the retention guard" if guarded else "no successful candidate"
    elif weighted_first and ref is not None and not weighted(ref) - best_loss > rel.min_improvement:
        out.decision = f"best weighted sum {best_loss:.4f} does not improve on the base's {weighted(ref):.4f}"
    elif not weighted_first and ref is not None and not sign[objective] * (ref[oi] - best["values"][oi]) > rel.min_improvement:
        out.decision = f"best {objective} {best['values'][oi]:.4f} does not improve on {ref[oi]:.4f}"
    elif not rel.auto:
        out.decision = "rule met; release.auto is off"
    else:
        out.release = True
        if anchored and guarded:
            out.drift = {**drift, **{k: drift.get(k, 0.0) + d for k, d in losses(best).items()}}
    return out
