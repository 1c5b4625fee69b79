"""Search-quality benchmark on the tiny zoo: optimizers at an equal budget of evaluations, early
rejection, and subset fitness.

    python experiments/bench_search.py                      # 160 evaluations x 5 seeds (~15-25 min, 1 core)
    python experiments/bench_search.py --quick              # 48 evaluations x 2 seeds, population 8
    python experiments/bench_search.py --nsga2              # also the 2-objective NSGA-II comparison
    python experiments/bench_search.py --heldout            # held-out study (experiments/bench_heldout.py)
    python experiments/bench_search.py --async              # async vs sync search (experiments/bench_async.py)

One process, one torch thread, no Ray and no run store: a single resident
``evo.scoring.evaluator.Evaluator`` built from ``evo.scoring.sources.Sources.load(cfg)`` scores every candidate,
and the optimizers are driven through ask/tell exactly as ``evo.loop.driver`` does (same initial
genomes: the uniform average and plain task arithmetic). A recipe seen before in the same run
costs no budget; results are memoised across runs to save wall time only.

Objective: mean held-out log-perplexity (valid split) over the zoo's domains, search space
``search_spaces/task_arithmetic_layerwise.yaml``, evaluation as in the quickstart (3 domains x 12
blocks x 128 tokens; the quickstart uses 48 blocks). Outputs ``experiments/out/bench_search.md`` (+ ``.json``) and the plot
``docs/img/bench_search.png``.

Sections:
1. ``ga``, ``cmaes``, ``random`` (and with ``--nsga2`` a 2-objective run) over ``--seeds`` seeds.
2. Early rejection: the GA again with ``reject_above`` = the k-th best (k=4) of the current
   population (as ``evo.scoring.rejection.kth_best``), default chunks/z/margin from
   ``evo.core.config.EarlyRejection``; evaluation work saved and change in the final best.
3. Subset fitness: 25% of the valid blocks picked at difficulty quantiles (difficulty = mean block
   NLL of the base and the specialists), Spearman correlation of subset vs full scores over random
   candidates and over candidates from a GA run (near the optimum), and the time saved.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from _common import OUT, ROOT, md_head, md_row, mean_logppl, one_thread, spread, write_json, write_text, zoo_ready

one_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_async  # noqa: E402
import bench_heldout  # noqa: E402
from _resident import EVAL, Bench  # noqa: E402

OPTIMIZERS = ("ga", "cmaes", "random")


def with_paired(cfg, paired: bool):
    """``cfg`` with early rejection paired or not (configs are frozen: a new one)."""
    er = replace(cfg.eval.early_rejection, paired=paired)
    return replace(cfg, eval=replace(cfg.eval, early_rejection=er))


# ----------------------------------------------------------------------------- one search run
def objectives_of(metrics: dict, kind: str, domains: list[str]) -> list[float]:
    if kind == "mean":
        return [mean_logppl(metrics)]
    # 2 objectives: code vs the natural-language domains (or the first domain vs the rest)
    second = "code" if "code" in domains else domains[0]
    rest = [d for d in domains if d != second]
    return [sum(metrics[f"logppl/{d}"] for d in rest) / len(rest), metrics[f"logppl/{second}"]]


def search(bench: Bench, name: str, seed: int, budget: int, population: int, *, reject: bool = False,
           kind: str = "mean") -> dict:
    """Ask/tell until ``budget`` distinct recipes have been evaluated; best-so-far after each one."""
    from evo.search.optim import make_optimizer
    from evo.scoring.rejection import kth_best

    n_obj = 1 if kind == "mean" else 2
    options = {"population": population, "initial": bench.initial}
    opt = make_optimizer(name, bench.space.dim, directions=["minimize"] * n_obj, seed=seed, options=options)
    seen: dict[str, tuple] = {}  # key -> (values, status, fraction)
    curve, work_curve, points, evaluated = [], [], [], []
    best, best_recipe, work, rejected = math.inf, None, 0.0, 0
    stale, t0 = 0, time.perf_counter()
    while len(curve) < budget and stale < 50:
        genomes = opt.ask()
        threshold = None
        if reject:  # as the runner does: the k-th best, paired on its per-block scores when known
            threshold = kth_best(bench.cfg, opt, lambda g: bench.memo.get(bench.space.decode(g).key()))
        values, full = [], False
        new = 0
        for g in genomes:
            recipe = bench.space.decode(g)
            key = recipe.key()
            if key not in seen:
                if len(curve) >= budget:
                    full = True
                    break
                res = bench.with_rejection(recipe, threshold) if reject else bench.full(recipe)
                new += 1
                if res["status"] in ("ok", "rejected"):
                    vals = objectives_of(res["metrics"], kind, bench.domains)
                else:
                    vals = None
                frac = res.get("evaluated_fraction", 1.0) if res["status"] != "failed" else 1.0
                seen[key] = (vals, res["status"], frac)
                work += frac
                rejected += res["status"] == "rejected"
                if res["status"] == "ok":
                    points.append(vals)
                    score = sum(vals) / len(vals) if kind != "mean" else vals[0]
                    if score < best:
                        best, best_recipe = score, recipe
                evaluated.append(recipe)
                curve.append(best)
                work_curve.append(work)
            values.append(seen[key][0])
        if full:
            break
        stale = stale + 1 if new == 0 else 0
        opt.tell(genomes, values)
    while len(curve) < budget:  # the optimizer stopped proposing new recipes
        curve.append(best)
        work_curve.append(work)
    return {"optimizer": name, "seed": seed, "reject": reject, "kind": kind, "curve": curve, "work_curve": work_curve,
            "best": best, "best_recipe": best_recipe, "work": work, "rejected": rejected, "points": points,
            "evaluated": evaluated, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- subset fitness
def block_scores(bench: Bench, recipe, sets: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-block mean NLL on ``sets`` after merging ``recipe`` into the resident model."""
    return bench.ev.block_scores(recipe.to_dict(), sets)


def spearman(a, b) -> float:
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b)[0])
    except ImportError:
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])


def subset_study(bench: Bench, baselines: dict, near_optimum: list, n_random: int, frac: float, seed: int = 1234) -> dict:
    valid = bench.ev.eval_sets["valid"]
    # difficulty: mean block NLL over the base and the specialists
    fixed = [r for label, r in baselines.items() if label == "base" or label.startswith("specialist:")]
    per_model = [block_scores(bench, r, valid) for r in fixed]
    chosen = {}
    for name, blocks in valid.items():
        difficulty = np.mean([m[name] for m in per_model], axis=0)
        n = len(blocks)
        k = max(1, round(frac * n))
        order = np.argsort(difficulty)
        chosen[name] = sorted(int(order[int((i + 0.5) * n / k)]) for i in range(k))
    n_sub = sum(len(v) for v in chosen.values())
    n_all = sum(len(b) for b in valid.values())

    def score(blocks: dict[str, np.ndarray], pick: dict[str, list[int]] | None) -> float:
        return float(np.mean([blocks[s][pick[s]].mean() if pick else blocks[s].mean() for s in blocks]))

    rng = np.random.default_rng(seed)
    random_cands = [bench.space.decode(rng.random(bench.space.dim)) for _ in range(n_random)]
    out = {"blocks": n_sub, "of": n_all, "chosen": chosen, "groups": {}}
    check = None
    for group, cands in (("random candidates", random_cands), ("GA candidates (near the optimum)", near_optimum)):
        scores = [block_scores(bench, r, valid) for r in cands]
        if check is None:  # the block means reproduce the evaluator's metric
            ref = mean_logppl(bench.full(cands[0])["metrics"])
            check = abs(score(scores[0], None) - ref)
            assert check < 1e-6, f"block means differ from Evaluator.evaluate by {check}"
        full = np.array([score(s, None) for s in scores])
        sub = np.array([score(s, chosen) for s in scores])
        rho = spearman(full, sub)
        # control: stratified random subsets of the same size
        ctrl = []
        for _ in range(200):
            pick = {s: sorted(rng.choice(len(valid[s]), len(chosen[s]), replace=False).tolist()) for s in valid}
            ctrl.append(spearman(full, np.array([score(s, pick) for s in scores])))
        top = max(1, len(cands) // 10)
        overlap = len(set(np.argsort(full)[:top]) & set(np.argsort(sub)[:top]))
        winner_rank = int(np.argsort(np.argsort(full))[int(np.argmin(sub))]) + 1
        out["groups"][group] = {
            "n": len(cands), "spearman": rho, "random_subsets_median": float(np.median(ctrl)),
            "random_subsets_p10": float(np.percentile(ctrl, 10)), "top_overlap": overlap, "top": top,
            "subset_winner_full_rank": winner_rank, "full_range": [float(full.min()), float(full.max())],
            "mean_abs_gap": float(np.mean(np.abs(sub - full))),
        }
    # cost: a full evaluation against merge + forward passes over the subset only
    sub_sets = {s: valid[s][chosen[s]] for s in valid}
    t_full, t_sub = [], []
    for r in random_cands[:20]:
        t0 = time.perf_counter()
        bench.ev.evaluate(r.to_dict())
        t_full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        block_scores(bench, r, sub_sets)
        t_sub.append(time.perf_counter() - t0)
    out["full_s"] = statistics.median(t_full)
    out["subset_s"] = statistics.median(t_sub)
    out["check"] = check
    return out


# ----------------------------------------------------------------------------- hypervolume (2-D, minimise)
def hypervolume(points, ref) -> float:
    pts = sorted((p for p in points if p[0] < ref[0] and p[1] < ref[1]), key=lambda p: (p[0], p[1]))
    hv, y = 0.0, ref[1]
    for x0, y0 in pts:
        if y0 < y:
            hv += (ref[0] - x0) * (y - y0)
            y = y0
    return hv


# ----------------------------------------------------------------------------- report
def plot(runs, rej_runs, base_values, budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    x = np.arange(1, budget + 1)
    colors = {"ga": "C0", "cmaes": "C1", "random": "C2"}
    lo_all, hi_all = [], []
    for name in OPTIMIZERS:
        curves = np.array([r["curve"] for r in runs if r["optimizer"] == name])
        med = np.median(curves, axis=0)
        ax.plot(x, med, color=colors[name], label=f"{name} (median of {len(curves)})")
        ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=colors[name], alpha=0.18)
        lo_all.append(curves.min())
        hi_all.append(np.median(curves[:, min(4, budget - 1)]))
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]
    for i, (label, v) in enumerate(base_values.items()):
        ax.axhline(v, color="0.35", ls=styles[i % len(styles)], lw=1, label=f"{label} ({v:.3f})")
    lo = min(lo_all)
    hi = max(max(hi_all), base_values.get("base", min(base_values.values())))
    pad = 0.08 * (hi - lo)
    ax.set_ylim(lo - pad, hi + 2 * pad)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best mean log-perplexity so far (valid)")
    ax.set_title("Search at equal budget (lines above the frame are off-scale)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)

    ax = axes[1]
    grid = np.linspace(0, budget, 200)
    groups = [("ga", [r for r in runs if r["optimizer"] == "ga"])]
    groups += [(f"ga + early rejection, {z}", g) for z, g in rej_runs.items()]
    for i, (label, group) in enumerate(groups):
        color = colors.get(label, f"C{3 + i}")
        ys = np.array([np.interp(grid, [0] + r["work_curve"], [r["curve"][0]] + r["curve"]) for r in group])
        ax.plot(grid, np.median(ys, axis=0), color=color, label=label)
        ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.18)
    ax.set_ylim(lo - pad, hi + 2 * pad)
    ax.set_xlabel("evaluation work (candidates' worth of forward passes)")
    ax.set_title("Early rejection: best so far vs work")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--heldout" in argv:  # evolved vs the best simple baseline on the test split, via evo.run
        return bench_heldout.main([a for a in argv if a != "--heldout"])
    if "--async" in argv:  # asynchronous vs synchronous search at equal evaluations
        return bench_async.main([a for a in argv if a != "--async"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--budget", type=int, default=160, help="evaluations per run")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--max-blocks", type=int, default=EVAL["max_blocks"], help="evaluation blocks per domain")
    p.add_argument("--batch-size", type=int, default=EVAL["batch_size"])
    p.add_argument("--subset-candidates", type=int, default=60)
    p.add_argument("--subset-fraction", type=float, default=0.25)
    p.add_argument("--reject-z", default=None, help="z values for the early-rejection runs, comma-separated "
                   "(default: the configured one)")
    p.add_argument("--nsga2", action="store_true", help="also the 2-objective comparison (nsga2, ga, random)")
    p.add_argument("--quick", action="store_true", help="48 evaluations, 2 seeds, population 8, 24 subset candidates")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "bench_search.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.seeds, args.population, args.subset_candidates = 48, 2, 8, 24
    EVAL.update(max_blocks=args.max_blocks, batch_size=args.batch_size)
    if not zoo_ready(args.zoo, "bench_search"):
        return 2
    from evo.scoring.rejection import RejectionTest
    from evo.loop.selection import baseline_recipes

    if args.reject_z is None:
        from evo.core.config import EarlyRejection

        args.reject_z = str(EarlyRejection().z)
    t_start = time.time()
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    bench = Bench(args.zoo)
    baselines = baseline_recipes(bench.cfg)
    base_values = {}
    for label, r in baselines.items():
        res = bench.full(r)
        assert res["status"] == "ok", (label, res)
        base_values[label] = mean_logppl(res["metrics"])
    print("baselines: " + ", ".join(f"{k} {v:.4f}" for k, v in base_values.items()), flush=True)
    seeds = list(range(args.seeds))

    # 1. optimizers at equal budget
    runs, timings = [], {}
    for name in OPTIMIZERS:
        t0 = time.time()
        for s in seeds:
            r = search(bench, name, s, args.budget, args.population)
            runs.append(r)
            print(f"  {name:7s} seed {s}: best {r['best']:.4f}  ({r['seconds']:.0f}s)", flush=True)
        timings[name] = time.time() - t0

    # 2. early rejection (GA): paired on the k-th best's blocks (the default) and the unpaired
    # bound, at the configured z, then any other z asked for
    rej_runs: dict[str, list] = {}
    for z in [float(x) for x in args.reject_z.split(",")]:
        for paired in (True, False):
            label = f"z={z:g}, {'paired' if paired else 'bound'}"
            t0 = time.time()
            bench.ev.rejection = replace(bench.ev.rejection, z=z)
            bench.cfg = with_paired(bench.cfg, paired)
            rej_runs[label] = []
            for s in seeds:
                r = search(bench, "ga", s, args.budget, args.population, reject=True)
                rej_runs[label].append(r)
                print(f"  ga+rej {label} seed {s}: best {r['best']:.4f}  work {r['work']:.1f}/{args.budget}  "
                      f"rejected {r['rejected']}  ({r['seconds']:.0f}s)", flush=True)
            timings[f"ga + early rejection {label}"] = time.time() - t0
    bench.ev.rejection = RejectionTest.of(bench.er)
    bench.cfg = with_paired(bench.cfg, True)

    # 3. subset fitness: random candidates and the last candidates of GA seed 0
    t0 = time.time()
    ga0 = next(r for r in runs if r["optimizer"] == "ga" and r["seed"] == 0)
    near = ga0["evaluated"][-args.subset_candidates:]
    sub = subset_study(bench, baselines, near, args.subset_candidates, args.subset_fraction)
    timings["subset study"] = time.time() - t0
    print("  subset: " + ", ".join(f"{g}: rho {v['spearman']:.3f}" for g, v in sub["groups"].items()), flush=True)

    # 4. optional: 2 objectives
    mo = None
    if args.nsga2:
        t0 = time.time()
        base_obj = {label: objectives_of(bench.full(r)["metrics"], "two", bench.domains) for label, r in baselines.items()}
        ref = [max(v[0] for v in base_obj.values()), max(v[1] for v in base_obj.values())]
        mo = {"ref": ref, "runs": {}, "baselines_hv": hypervolume(list(base_obj.values()), ref)}
        for name in ("nsga2", "ga", "random"):
            hvs = []
            for s in seeds:
                r = search(bench, name, s, args.budget, args.population, kind="two")
                hvs.append(hypervolume(r["points"], ref))
            mo["runs"][name] = hvs
            print(f"  2-objective {name}: hypervolume {spread(hvs)}", flush=True)
        timings["2-objective"] = time.time() - t0

    # test split of the winners (generalisation check; the search never saw it)
    test_of = {}
    if bench.sources.has_report_sets:
        for label, r in baselines.items():
            test_of[label] = mean_logppl(bench.ev.evaluate(r.to_dict(), collection="test")["metrics"])
        for r in runs + [r for g in rej_runs.values() for r in g]:
            r["test"] = mean_logppl(bench.ev.evaluate(r["best_recipe"].to_dict(), collection="test")["metrics"])

    # ------------------------------------------------------------------- tables
    B, P = args.budget, args.population
    best_base_label = min(base_values, key=base_values.get)
    best_base = base_values[best_base_label]
    marks = [max(1, round(q * B)) for q in (0.25, 0.5, 1.0)]
    lines = [
        f"Tiny zoo, `task_arithmetic_layerwise` ({bench.space.dim} genes), objective: mean log-perplexity over "
        f"{', '.join(bench.domains)} (valid split, {EVAL['max_blocks']} blocks x {EVAL['seq_len']} tokens each; lower is better). "
        f"Budget {B} evaluations per run, population {P}, seeds {', '.join(map(str, seeds))}; "
        f"values are median [min–max] over seeds. Test = the same winners on the test split.",
        "",
        md_head("optimizer", f"best @ {marks[0]} evals", f"best @ {marks[1]}", f"final best @ {marks[2]}",
                "vs best baseline", "runs beating it", "test (median)"),
    ]
    for name in OPTIMIZERS:
        group = [r for r in runs if r["optimizer"] == name]
        finals = [r["best"] for r in group]
        beat = sum(f < best_base for f in finals)
        test = f"{statistics.median(r['test'] for r in group):.4f}" if test_of else "–"
        lines.append(md_row(name, spread([r["curve"][marks[0] - 1] for r in group]),
                            spread([r["curve"][marks[1] - 1] for r in group]), f"**{spread(finals)}**",
                            f"{statistics.median(finals) - best_base:+.4f}", f"{beat}/{len(group)}", test))
    for label, v in base_values.items():
        lines.append(f"| baseline: {label} | | | {v:.4f} | {v - best_base:+.4f} | | {test_of.get(label, float('nan')):.4f} |")
    med = {n: statistics.median(r["best"] for r in runs if r["optimizer"] == n) for n in OPTIMIZERS}
    order = sorted(OPTIMIZERS, key=med.get)
    lines += ["", "Ranking by median final best: " + " < ".join(f"{n} ({med[n]:.4f})" for n in order)
              + f"; best fixed baseline: {best_base_label} ({best_base:.4f})."]

    ga_runs = [r for r in runs if r["optimizer"] == "ga"]
    zs = list(rej_runs)
    lines += [
        "",
        f"Early rejection (GA, k={bench.er.k}, chunks={bench.er.chunks}, margin={bench.er.margin}; z={bench.er.z:g} is the "
        f"configured default; same seeds, same {B} candidates):",
        "",
        "| | GA | " + " | ".join(f"GA + early rejection, {z}" for z in zs) + " |",
        "|---|---|" + "---|" * len(zs),
    ]
    works = {z: [r["work"] for r in rej_runs[z]] for z in zs}

    def row(label, first, cells):
        lines.append(md_row(label, first, *cells))

    row("evaluation work (candidates' worth), median [min–max]", str(B),
        [f"{statistics.median(works[z]):.1f} [{min(works[z]):.1f}–{max(works[z]):.1f}]" for z in zs])
    row("work saved (median)", "", [f"{100 * (1 - statistics.median(works[z]) / B):.1f}%" for z in zs])
    row("candidates rejected (median)", "", [f"{statistics.median(r['rejected'] for r in rej_runs[z]):.0f} of {B}" for z in zs])
    row("final best", spread([r["best"] for r in ga_runs]), [spread([r["best"] for r in rej_runs[z]]) for z in zs])
    row("change in final best, per seed", "",
        [", ".join(f"{b['best'] - a['best']:+.4f}" for a, b in zip(ga_runs, rej_runs[z])) for z in zs])
    row("plain GA's best after the same work", "",
        [spread([a["curve"][max(1, round(w)) - 1] for a, w in zip(ga_runs, works[z])]) for z in zs])
    row("wall time, all seeds", f"{timings['ga']:.0f} s", [f"{timings[f'ga + early rejection {z}']:.0f} s" for z in zs])
    lines += [
        "",
        f"Subset fitness: {sub['blocks']} of {sub['of']} valid blocks ({100 * sub['blocks'] / sub['of']:.0f}%), "
        f"picked per domain at difficulty quantiles of the base and the specialists.",
        "",
        md_head("candidates", "n", "Spearman (subset vs full)", "random subsets of that size: median / 10th pct",
                "top-10% overlap", "subset's winner ranks (full)", "mean abs gap"),
    ]
    for g, v in sub["groups"].items():
        lines.append(md_row(g, v["n"], f"**{v['spearman']:.3f}**",
                            f"{v['random_subsets_median']:.3f} / {v['random_subsets_p10']:.3f}",
                            f"{v['top_overlap']}/{v['top']}", v["subset_winner_full_rank"], f"{v['mean_abs_gap']:.4f}"))
    lines += ["", f"Cost per candidate: full evaluation {1e3 * sub['full_s']:.0f} ms, merge + subset forward passes "
              f"{1e3 * sub['subset_s']:.0f} ms: {100 * (1 - sub['subset_s'] / sub['full_s']):.0f}% saved "
              f"(the merge is not reduced)."]
    if mo:
        lines += ["", f"2 objectives (non-code domains, code), hypervolume of all evaluated points above reference "
                  f"{[round(x, 4) for x in mo['ref']]} (worst baseline per objective; higher is better; fixed baselines alone: "
                  f"{mo['baselines_hv']:.5f}):", "", md_head("optimizer", "hypervolume, median [min–max]")]
        for name, hvs in mo["runs"].items():
            lines.append(md_row(name, f"{statistics.median(hvs):.5f} [{min(hvs):.5f}–{max(hvs):.5f}]"))
    wall = time.time() - t_start
    lines += ["", f"Wall time: {wall:.0f} s in one process with 1 torch thread ({bench.n_computed} evaluations computed, "
              f"{bench.eval_seconds:.0f} s inside the evaluator); per section: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "."]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    out = Path(args.out)
    write_text(out / "bench_search.md", text)
    plot(runs, rej_runs, base_values, B, Path(args.plot))
    if Path(args.plot).resolve() != (out / "bench_search.png").resolve():
        plot(runs, rej_runs, base_values, B, out / "bench_search.png")
    dump = {
        "args": vars(args), "baselines": base_values, "test": test_of, "subset": sub, "two_objectives": mo,
        "runs": [{k: v for k, v in r.items() if k not in ("best_recipe", "evaluated", "points")}
                 | {"best_recipe": r["best_recipe"].to_dict() if r["best_recipe"] else None} for r in runs + [r for g in rej_runs.values() for r in g]],
        "wall_s": wall,
    }
    write_json(out / "bench_search.json", dump)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
