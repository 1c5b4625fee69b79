"""Racing on the selection split: stop scoring a candidate once it clearly cannot be chosen.

Scoring every selection candidate on the whole selection split cost as much as the search
itself on a real-model zoo (issue 26: 16 candidates x 256 blocks), yet most candidates are
out of contention after a few blocks: TIES at its defaults, a far-off task-arithmetic scale, a
hall-of-fame entry well behind the best. A race scores the candidates in rounds over growing
prefixes of a fixed, seeded order of the split's blocks (doubling: 1/8, 1/4, 1/2, all of it for
four rounds), every candidate still in the race on the same blocks, so candidates are compared
*paired per block* (block difficulty cancels, as in early rejection and
:func:`evo.data.draws.paired_difference`, stratified per evaluation set). After each round but
the last a candidate is dropped when the paired interval of (candidate - its rival) on every
block seen so far lies wholly above zero: it is clearly worse. Its rival is a *leader*, never
dropped (its interval against itself is zero), so every leader is scored on the whole split.
Who races whom is the caller's rule (``evo.loop.selection``: each candidate races the leader of
its kind, so the best evolved recipe, the best task-arithmetic scale and the best simple
baseline all finish on the whole split, as full selection would have scored them).

The interval's width controls the multiple looks: ``z`` is the one-sided normal quantile of
2.5% split (Bonferroni) over every look and every rival a candidate could be measured against,
``z = Phi^-1(1 - 0.025 / (looks x (entrants - 1)))`` (3.31 for 19 candidates over 3 looks),
never below the 95% interval's 1.96. So the chance that any candidate which would win its kind
on the whole split is dropped early stays under 2.5% per race, at the normal approximation;
no round looks before every set has ``MIN_LOOK_BLOCKS`` blocks, below which a set's spread is
too poorly known for a normal interval.

Everything here is deterministic: the block order is drawn from the run's seed, rounds run in
a fixed order, ties go to the earlier entrant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Mapping, Sequence

import numpy as np

from evo.data.draws import Z95, paired_difference

ALPHA = 0.025  # one-sided, for the whole race (the upper tail of a two-sided 95% interval)
MIN_LOOK_BLOCKS = 8  # per evaluation set, before a round may drop anyone
ORDER_SALT = 0x5E1EC7  # the block order's stream of the run's seed (not the search draws')

ScoreChunk = Callable[[list[str], dict[str, list[int]]], Mapping[str, dict]]
Rivals = Callable[[dict[str, float]], dict[str, str]]


def block_order(sizes: Mapping[str, int], seed: int) -> dict[str, list[int]]:
    """A seeded permutation of each set's blocks: a round's prefix is then a random sample of
    the split, not its first documents (neighbouring blocks share a document, and a prefix of
    few documents would understate the spread)."""
    rng = np.random.default_rng([seed, ORDER_SALT])
    return {name: [int(i) for i in rng.permutation(sizes[name])] for name in sorted(sizes)}


def round_counts(sizes: Mapping[str, int], rounds: int) -> list[dict[str, int]]:
    """Blocks per set seen by the end of each round: doubling prefixes ending at every block
    (``rounds`` 4: 1/8, 1/4, 1/2, 1 of each set). A round that would look before every set has
    ``MIN_LOOK_BLOCKS`` is merged into the next; the last round is always the whole split. Every
    round adds blocks to every set (from 8 blocks or more, doubling the share adds at least 7)."""
    out: list[dict[str, int]] = []
    for r in range(rounds):
        share = 2.0 ** (r - rounds + 1)
        counts = {name: min(n, math.ceil(n * share)) for name, n in sizes.items()}
        last = r == rounds - 1
        if not last and min(counts.values()) < MIN_LOOK_BLOCKS:
            continue
        if out and out[-1] == counts:
            continue
        out.append(counts)
    return out


def race_z(looks: int, entrants: int) -> float:
    """The interval's half-width in standard errors (module docstring: Bonferroni over every
    look and every rival, one-sided 2.5% in all; never narrower than the 95% interval)."""
    tests = max(1, looks) * max(1, entrants - 1)
    return max(Z95, NormalDist().inv_cdf(1.0 - ALPHA / tests))


@dataclass
class Lane:
    """One candidate in the race: its per-block NLLs so far (in the race's block order, so
    two lanes pair block for block), each round's result, and how it left the race."""

    label: str
    nlls: dict[str, list[float]] = field(default_factory=dict)
    blocks: dict[str, list[int]] = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)
    dropped: dict | None = None
    failed: dict | None = None

    @property
    def running(self) -> bool:
        return self.dropped is None and self.failed is None

    def add(self, result: dict | None, chunk: Mapping[str, Sequence[int]]) -> None:
        """One round's result on ``chunk``; a failure ends the lane (the candidate failed)."""
        if not result or result.get("status") != "ok" or not result.get("block_nlls"):
            self.failed = result or {"status": "failed", "error": "no result"}
            return
        for name, idx in chunk.items():
            self.nlls.setdefault(name, []).extend(result["block_nlls"][name])
            self.blocks.setdefault(name, []).extend(idx)
        self.parts.append(result)

    def mean(self) -> float:
        """Mean over sets of the mean NLL per set, on the blocks seen (the ranking's scale)."""
        return float(np.mean([np.mean(v) for v in self.nlls.values()]))

    def seen(self) -> int:
        return sum(len(v) for v in self.nlls.values())


def verdict(lane: Lane, rival: Lane, sets: Sequence[str], z: float) -> dict | None:
    """Why ``lane`` leaves the race, or None: its paired difference with ``rival`` on the blocks
    both have seen, with a ``z``-standard-error interval lying wholly above zero."""
    if lane is rival:
        return None
    d = paired_difference(lane.nlls, rival.nlls, sets)
    lo, hi = d["mean"] - z * d["se"], d["mean"] + z * d["se"]
    if lo <= 0.0:
        return None
    return {"after_blocks": d["blocks"], "vs": rival.label, "z": z,
            "difference": {"mean": d["mean"], "se": d["se"], "lo": lo, "hi": hi}}


def run_race(entrants: Sequence[str], score_chunk: ScoreChunk, rivals: Rivals, *, sizes: Mapping[str, int],
             rounds: int, seed: int) -> tuple[dict[str, Lane], dict]:
    """Race ``entrants`` over the split whose sets have ``sizes`` blocks.

    ``score_chunk(labels, {set: row indices}) -> {label: result}`` scores the still-running
    candidates on the next chunk (evaluator results with ``block_nlls`` in the order of the
    indices); ``rivals({label: mean so far}) -> {label: rival label}`` names each running
    candidate's rival, a leader it must be clearly worse than to be dropped. Returns the lanes
    and a summary (the rounds' blocks per set, ``z``, blocks scored)."""
    sets = sorted(sizes)
    order = block_order(sizes, seed)
    counts = round_counts(sizes, rounds)
    z = race_z(len(counts) - 1, len(entrants))
    lanes = {label: Lane(label) for label in entrants}
    start = {name: 0 for name in sets}
    for r, count in enumerate(counts):
        chunk = {name: order[name][start[name]:count[name]] for name in sets}
        running = [k for k, lane in lanes.items() if lane.running]
        results = score_chunk(running, chunk)
        for k in running:
            lanes[k].add(results.get(k), chunk)
        start = count
        if r < len(counts) - 1:
            drop_clearly_worse(lanes, rivals, sets, z, round_no=r + 1)
    summary = {"rounds": [sum(c.values()) for c in counts], "z": z,
               "blocks_scored": sum(lane.seen() for lane in lanes.values())}
    return lanes, summary


def drop_clearly_worse(lanes: dict[str, Lane], rivals: Rivals, sets: Sequence[str], z: float, *, round_no: int) -> None:
    """One look: every running lane against its rival, all on the same blocks; the drops of a
    round are decided together (a rival is a leader, which no verdict drops)."""
    running = {k: lane for k, lane in lanes.items() if lane.running}
    rival = rivals({k: lane.mean() for k, lane in running.items()})
    for k, lane in running.items():
        out = verdict(lane, running[rival[k]], sets, z) if rival.get(k) in running else None
        if out is not None:
            lane.dropped = {**out, "round": round_no}


def merged_result(lane: Lane, sizes: Mapping[str, int]) -> dict:
    """The lane's rounds as one evaluator result: per-set log-perplexity over every block it
    saw and ``block_nlls`` in the split's own row order (so a lane that saw the whole split
    reads as a full evaluation would); timings summed over rounds."""
    if lane.failed is not None:
        return lane.failed
    last = lane.parts[-1]
    metrics = dict(last.get("metrics") or {})
    ordered = {}
    for name, values in lane.nlls.items():
        pairs = sorted(zip(lane.blocks[name], values))
        ordered[name] = [v for _, v in pairs]
        # the chunk means weighted by their blocks: each is the evaluator's own unrounded mean
        weights = [len(p["block_nlls"][name]) for p in lane.parts]
        metrics[f"logppl/{name}"] = float(np.average([p["metrics"][f"logppl/{name}"] for p in lane.parts],
                                                     weights=weights))
    timings: dict[str, float] = {}
    for part in lane.parts:
        for key, value in (part.get("timings") or {}).items():
            timings[key] = timings.get(key, 0.0) + value
    return {"status": "ok", "metrics": metrics, "block_nlls": ordered, "timings": timings,
            "evaluated_fraction": lane.seen() / max(1, sum(sizes.values())), "rounds": len(lane.parts),
            "worker": last.get("worker")}
