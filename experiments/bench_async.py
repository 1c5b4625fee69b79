"""Search quality of asynchronous (steady-state) against generation-synchronous search, at equal
evaluations, and best-so-far against wall time.

    python experiments/bench_search.py --async            # (or python experiments/bench_async.py)
    python experiments/bench_async.py --quick             # 48 evaluations x 2 seeds

Each optimizer (``ga``, ``cmaes``, ``nsga2``, ``random``) runs ``--seeds`` seeds in both modes
with the same budget of distinct recipes evaluated. Objective values are real: every recipe is
merged and scored by one resident ``evo.scoring.evaluator.Evaluator`` in this process (the tiny zoo,
valid split, as bench_search.py). The *schedule* is simulated, so that both modes see the same
evaluator speeds and the comparison is not at the mercy of this machine's load: ``--evaluators``
virtual evaluators, each candidate taking the seconds its evaluation measured here, one recipe in
EVERY (by a hash of its key, the same in both modes) FACTOR times longer (``--straggler``), as
bench_runner.py --busy's straggling evaluator does in real Ray runs.

* synchronous: ``ask()`` a generation, list-schedule it onto the evaluators in ask order, wait
  for the last one, ``tell()`` it (what ``optimizer.async: false`` does);
* asynchronous: ``ask_one()`` whenever an evaluator is free, ``tell_one()`` each result at the
  moment it finishes (what ``evo.loop.steady_state`` does).

Outputs ``experiments/out/bench_async.md`` (+ ``.json``) and ``docs/img/bench_async.png``.
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import statistics
import sys
import time
from pathlib import Path

from _common import OUT, ROOT, md_head, md_row, mean_logppl, one_thread, spread, write_json, write_text, zoo_ready

one_thread()

import numpy as np  # noqa: E402

from _resident import EVAL, Bench  # noqa: E402

OPTIMIZERS = ("ga", "cmaes", "nsga2", "random")


class Costs:
    """Seconds each recipe takes on a virtual evaluator: its measured evaluation here, times
    FACTOR for one recipe in EVERY."""

    def __init__(self, bench, every: int, factor: float):
        self.bench, self.every, self.factor = bench, every, factor
        self.seconds: dict[str, float] = {}

    def evaluate(self, recipe) -> tuple[list[float] | None, float]:
        key = recipe.key()
        fresh = key not in self.bench.memo
        t0 = time.perf_counter()
        res = self.bench.full(recipe)
        if fresh:
            self.seconds[key] = time.perf_counter() - t0
        cost = self.seconds.get(key) or statistics.median(self.seconds.values())
        if int(hashlib.sha1(key.encode()).hexdigest(), 16) % self.every == 0:
            cost *= self.factor
        values = [mean_logppl(res["metrics"])] if res["status"] == "ok" else None
        return values, cost


def run_sync(bench, costs: Costs, name: str, seed: int, budget: int, population: int, evaluators: int) -> dict:
    from evo.search.optim import make_optimizer

    opt = make_optimizer(name, bench.space.dim, directions=["minimize"], seed=seed,
                         options={"population": population, "initial": bench.initial})
    seen: dict[str, list[float] | None] = {}
    clock, best, events, stale = 0.0, math.inf, [], 0
    while len(seen) < budget and stale < 50:
        genomes = opt.ask()
        free = [clock] * evaluators
        values, new = [], 0
        for g in genomes:
            recipe = bench.space.decode(g)
            key = recipe.key()
            if key not in seen:
                if len(seen) >= budget:
                    break
                vals, cost = costs.evaluate(recipe)
                e = int(np.argmin(free))
                free[e] += cost
                seen[key] = vals
                new += 1
                if vals is not None and vals[0] < best:
                    best = vals[0]
                events.append((free[e], best, len(seen)))
            values.append(seen[key])
        clock = max(free)  # the barrier: the next generation waits for the slowest
        if len(values) < len(genomes):
            break
        stale = stale + 1 if new == 0 else 0
        opt.tell(genomes, values)
    return _summary(name, seed, "sync", events, clock, evaluators)


def run_async(bench, costs: Costs, name: str, seed: int, budget: int, population: int, evaluators: int) -> dict:
    from evo.search.optim import make_optimizer

    opt = make_optimizer(name, bench.space.dim, directions=["minimize"], seed=seed,
                         options={"population": population, "initial": bench.initial})
    seen: dict[str, list[float] | None] = {}
    running: list = []  # heap of (finish time, sequence, id, genome, values)
    clock, best, events, seq = 0.0, math.inf, [], 0

    def start(now: float) -> None:
        nonlocal seq
        while len(seen) < budget:
            cid = f"c{seq}"
            genome, _ = opt.ask_one(cid)
            seq += 1
            recipe = bench.space.decode(genome)
            key = recipe.key()
            if key in seen:  # a repeat costs nothing: told at once, ask again
                opt.tell_one(genome, seen[key], cid)
                continue
            vals, cost = costs.evaluate(recipe)
            seen[key] = vals
            heapq.heappush(running, (now + cost, seq, cid, genome, vals))
            return

    for _ in range(evaluators):
        start(0.0)
    while running:
        clock, _, cid, genome, vals = heapq.heappop(running)
        opt.tell_one(genome, vals, cid)
        if vals is not None and vals[0] < best:
            best = vals[0]
        events.append((clock, best, len(events) + 1))
        start(clock)
    return _summary(name, seed, "async", events, clock, evaluators)


def _summary(name, seed, mode, events, wall, evaluators) -> dict:
    events.sort()
    # best so far at each evaluation count (in the order results came in) and against time
    by_count = [min(b for t, b, _ in events[: i + 1]) for i in range(len(events))]
    return {"optimizer": name, "seed": seed, "mode": mode, "best": by_count[-1], "curve": by_count,
            "times": [t for t, _, _ in events], "wall": wall, "evaluators": evaluators}


def time_to_reach(run: dict, target: float) -> float | None:
    for t, b in zip(run["times"], run["curve"]):
        if b <= target:
            return t
    return None


def plot(runs: list[dict], names: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, names):
        for mode, style in (("sync", "--"), ("async", "-")):
            group = [r for r in runs if r["optimizer"] == name and r["mode"] == mode]
            end = max(r["wall"] for r in group)
            grid = np.linspace(0, end, 200)
            ys = np.array([np.interp(grid, r["times"], r["curve"], left=np.nan) for r in group])
            color = "C0" if mode == "async" else "C3"
            ax.plot(grid, np.nanmedian(ys, axis=0), style, color=color, label=f"{mode} (median of {len(group)})")
        ax.set_title(name)
        ax.set_xlabel("simulated wall time (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best mean log-perplexity so far (valid)")
    axes[0].legend(fontsize=8)
    lo = min(min(r["curve"]) for r in runs)
    hi = statistics.median(r["curve"][min(len(r["curve"]) - 1, 8)] for r in runs)
    axes[0].set_ylim(lo - 0.1 * (hi - lo), hi + 0.2 * (hi - lo))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--budget", type=int, default=160, help="distinct recipes evaluated per run")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--evaluators", type=int, default=4, help="virtual evaluators")
    p.add_argument("--straggler", default="8:4", help="EVERY:FACTOR")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--quick", action="store_true", help="48 evaluations, 2 seeds, population 8")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "bench_async.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.seeds, args.population = 48, 2, 8
    if not zoo_ready(args.zoo, "bench_async"):
        return 2
    names = tuple(args.optimizers.split(","))
    t_start = time.time()
    bench = Bench(args.zoo)
    every, factor = args.straggler.split(":")
    costs = Costs(bench, int(every), float(factor))
    runs = []
    for name in names:
        for s in range(args.seeds):
            for fn in (run_sync, run_async):
                r = fn(bench, costs, name, s, args.budget, args.population, args.evaluators)
                runs.append(r)
                print(f"  {name:6s} seed {s} {r['mode']:5s}: best {r['best']:.4f}, simulated wall {r['wall']:.1f} s",
                      flush=True)
    lines = [
        f"Tiny zoo, `task_arithmetic_layerwise` ({bench.space.dim} genes), mean log-perplexity on the valid split "
        f"({EVAL['max_blocks']} blocks x {EVAL['seq_len']} tokens per domain; lower is better); {args.budget} distinct "
        f"recipes per run, population {args.population}, seeds 0-{args.seeds - 1}; {args.evaluators} simulated "
        f"evaluators, one recipe in {every} {factor}x slower. Median [min–max] over seeds; Δ = async − sync per seed.",
        "",
        md_head("optimizer", "sync final best", "async final best", "Δ median [min–max]", "async ≤ sync",
                "wall sync → async (median)", "async time to sync's final best"),
    ]
    for name in names:
        sync = sorted((r for r in runs if r["optimizer"] == name and r["mode"] == "sync"), key=lambda r: r["seed"])
        asyn = sorted((r for r in runs if r["optimizer"] == name and r["mode"] == "async"), key=lambda r: r["seed"])
        deltas = [a["best"] - b["best"] for a, b in zip(asyn, sync)]
        reach = [time_to_reach(a, b["best"]) for a, b in zip(asyn, sync)]
        reach_frac = [t / b["wall"] for t, b in zip(reach, sync) if t is not None]
        reach_txt = (f"{100 * statistics.median(reach_frac):.0f}% of sync's wall ({len(reach_frac)}/{len(sync)} reach it)"
                     if reach_frac else "never")
        lines.append(md_row(name, spread([r["best"] for r in sync]), spread([r["best"] for r in asyn]),
                            f"{statistics.median(deltas):+.4f} [{min(deltas):+.4f}…{max(deltas):+.4f}]",
                            f"{sum(d <= 1e-12 for d in deltas)}/{len(deltas)}",
                            f"{statistics.median(r['wall'] for r in sync):.1f} s → "
                            f"{statistics.median(r['wall'] for r in asyn):.1f} s", reach_txt))
    text = "\n".join(lines) + f"\n\nWall time of the benchmark: {time.time() - t_start:.0f} s.\n"
    print()
    print(text)
    write_text(Path(args.out) / "bench_async.md", text)
    write_json(Path(args.out) / "bench_async.json", runs, indent=None)
    plot(runs, names, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
