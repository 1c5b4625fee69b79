"""Runner benchmark on the tiny zoo: Ray throughput with 1 and 2 evaluator actors, per-candidate
overhead outside merge + forward passes, and resident models against reloading them per candidate.

    python experiments/bench_runner.py                 # 40 candidates, 2 alternating repeats (~3 min)
    python experiments/bench_runner.py --quick         # 12 candidates, 1 repeat (~1 min)

Needs a built zoo (``python experiments/make_zoo.py --out zoo``). Every process runs torch with
one thread; on a 2-core machine run nothing else heavy at the same time. Writes the markdown
table to ``experiments/out/bench_runner.md`` and the raw numbers to ``bench_runner.json``.

What is measured (search space ``search_spaces/task_arithmetic_layerwise.yaml``, evaluation as in
the quickstart: 3 domains x 48 blocks x 128 tokens, batch 16):

* throughput: the same list of random genomes (fixed seed) through ``evo.cluster.pool.EvaluatorPool``
  with 1 and with 2 actors (``cpus_per_evaluator: 1, threads_per_evaluator: 1``) on one shared
  embedded local Ray, after the actors are up and warmed; alternating 1, 2, 1, 2, ... repeats.
* overhead: per candidate, driver wall time from dispatch (``.remote``) to the pool handing the
  result over, minus the evaluator's own ``merge_s`` and ``eval_s``; as a share of the wall.
* resident vs reload: in this process without Ray, the resident ``evo.scoring.evaluator.Evaluator``
  against loading base + sources from disk (``load_model_dir``, page cache warm: the best case
  for reloading), computing task vectors, building a fresh model and merging into it, then the
  same block log-likelihoods; both must give the same fitness.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import LAYERWISE, OUT, ROOT, local_ray, md_head, md_row, mean_logppl, one_thread, write_json, write_text, \
    zoo_ready

one_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402

EVAL = {"seq_len": 128, "max_blocks": 48, "batch_size": 16}  # the quickstart's evaluation (--max-blocks, --batch-size)


def make_config(zoo: str, evaluators: int = 1):
    from evo.loop.experiment import load_config

    return load_config({
        "name": "bench-runner",
        "zoo": zoo,
        "search_space": str(LAYERWISE),
        "eval": dict(EVAL),
        "objectives": [{"name": "mean_logppl", "metric": "logppl", "reduce": "mean", "goal": "minimize"}],
        "ray": {"evaluators": evaluators, "cpus_per_evaluator": 1, "threads_per_evaluator": 1,
                "dashboard": False, "candidate_timeout_s": 600},
        "seed": 0,
    })


def random_recipes(cfg, n: int, seed: int):
    from evo.loop.generation import make_space

    space = make_space(cfg)
    rng = np.random.default_rng(seed)
    return [space.decode(rng.random(space.dim)) for _ in range(n)]


# ----------------------------------------------------------------------------- Ray throughput
def pool_run(cfg, sources, recipes, warmup, label: str) -> dict:
    """One measurement: start a pool, wait for its actors, warm them up, time the candidate list."""
    from evo.cluster.pool import EvaluatorPool

    t_start = time.perf_counter()
    with EvaluatorPool(cfg, sources, run_name=label, quiet=True) as pool:
        pool.pids()  # blocks until every actor has built its model from the object store
        t_ready = time.perf_counter()
        warm = {f"warm-{i}": (f"{label}-warm-{i}", r) for i, r in enumerate(warmup)}
        pool.evaluate(warm, lambda k, r: None)
        todo = {r.key(): (f"{label}-c{i:03d}", r) for i, r in enumerate(recipes)}
        rows = []

        def on_result(key, result):
            # the pool stamps each result with when it was sent and when it came back
            name, t, d = todo[key][0], result.get("timings", {}), result["dispatch"]
            rows.append({"name": name, "status": result["status"], "wall_s": d["end"] - d["start"],
                         "merge_s": t.get("merge_s", 0.0), "eval_s": t.get("eval_s", 0.0),
                         "value": mean_logppl(result["metrics"]) if result["status"] == "ok" else None})

        t0 = time.perf_counter()
        pool.evaluate(todo, on_result)
        elapsed = time.perf_counter() - t0
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"{label}: {len(bad)} candidates failed: {bad[0]}")
    wall = sum(r["wall_s"] for r in rows)
    inside = sum(r["merge_s"] + r["eval_s"] for r in rows)
    return {
        "evaluators": cfg.ray.evaluators,
        "candidates": len(rows),
        "elapsed_s": elapsed,
        "per_minute": 60.0 * len(rows) / elapsed,
        "startup_s": t_ready - t_start,
        "mean_wall_s": wall / len(rows),
        "mean_merge_s": sum(r["merge_s"] for r in rows) / len(rows),
        "mean_eval_s": sum(r["eval_s"] for r in rows) / len(rows),
        "overhead_share": (wall - inside) / wall,  # time-weighted over candidates
        "overhead_share_median": statistics.median((r["wall_s"] - r["merge_s"] - r["eval_s"]) / r["wall_s"] for r in rows),
        "overhead_ms_median": 1e3 * statistics.median(r["wall_s"] - r["merge_s"] - r["eval_s"] for r in rows),
        "values": {r["name"].split("-c")[-1]: r["value"] for r in rows},
    }


def bench_ray(zoo: str, recipes, warmup, repeats: int) -> list[dict]:
    from evo.scoring.sources import Sources

    sources = Sources.load(make_config(zoo))
    tmp = tempfile.mkdtemp(prefix="rayb-", dir="/tmp")
    out = []
    with local_ray(num_cpus=2, object_store_memory=256 * 1024**2, _temp_dir=tmp):
        for rep in range(repeats):
            for n in (1, 2):
                res = pool_run(make_config(zoo, n), sources, recipes, warmup[: 2 * n], f"b{rep}e{n}")
                res["repeat"] = rep
                print(f"  repeat {rep}, {n} evaluator(s): {res['per_minute']:.1f} candidates/min, "
                      f"overhead {100 * res['overhead_share']:.1f}% (median {res['overhead_ms_median']:.1f} ms), "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                out.append(res)
    return out


# ----------------------------------------------------------------------------- dtype
def bench_dtype(zoo: str, recipes, dtypes: list[str], seq_len: int) -> str:
    """The same recipes on one resident evaluator per dtype (one thread each, interleaved so
    machine load hits every dtype alike): mean log-perplexity per recipe and seconds per candidate.
    Every dtype merges in float32 and rounds each tensor once into its resident model."""
    from evo.scoring.evaluator import Evaluator
    from evo.scoring.sources import Sources

    EVAL.update(seq_len=seq_len)
    cfg = make_config(zoo)
    sources = Sources.load(cfg)
    evs = {d: Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, threads=1,
                        batch_size=cfg.eval.batch_size, dtype=d) for d in dtypes}
    for ev in evs.values():  # warm-up: first-call allocations and kernels, in no dtype's favour
        ev.evaluate(recipes[0].to_dict())
    values = {d: [] for d in dtypes}
    seconds = {d: [] for d in dtypes}
    for r in recipes:
        for d, ev in evs.items():
            t0 = time.perf_counter()
            res = ev.evaluate(r.to_dict())
            seconds[d].append(time.perf_counter() - t0)
            values[d].append(mean_logppl(res["metrics"]))
    ref = dtypes[0]
    lines = [md_head("dtype", "candidates/min (1 thread)", f"speed vs {ref}", f"mean \\|Δ mean log-ppl\\| vs {ref}",
                     "max \\|Δ\\|", "rank agreement (Spearman)", align="lrrrrr")]
    for d in dtypes:
        rate = 60.0 / statistics.median(seconds[d])
        delta = [abs(a - b) for a, b in zip(values[d], values[ref])]
        rho = _spearman(values[d], values[ref])
        lines.append(md_row(d, f"{rate:.2f}", f"{statistics.median(seconds[ref]) / statistics.median(seconds[d]):.2f}×",
                            f"{statistics.mean(delta):.4f}", f"{max(delta):.4f}", f"{rho:.3f}"))
    n_blocks = sum(len(b) for b in sources.eval_sets["valid"].values())
    return (f"{len(recipes)} random recipes, {n_blocks} blocks × {seq_len} tokens per candidate, batch "
            f"{cfg.eval.batch_size}:\n\n" + "\n".join(lines) + "\n")


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else 1.0


# ----------------------------------------------------------------------------- resident vs reload
def bench_reload(zoo: str, recipes) -> dict:
    from evo.scoring.evaluator import Evaluator, build_model
    from evo.scoring.fitness import block_nlls
    from evo.merge import Merger, load_model_dir, task_vectors
    from evo.scoring.sources import Sources

    cfg = make_config(zoo)
    sources = Sources.load(cfg)
    valid = {name: torch.from_numpy(np.array(b, dtype=np.int64)) for name, b in sources.eval_sets["valid"].items()}
    bs = cfg.eval.batch_size

    ev = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, threads=1, batch_size=bs)
    torch.set_num_threads(1)

    def from_disk(recipe) -> tuple[float, dict]:
        t0 = time.perf_counter()
        base, config = load_model_dir(cfg.models.base)
        models = {name: load_model_dir(path)[0] for name, path in cfg.models.sources.items()}
        deltas = task_vectors(base, models)
        model = build_model(config.to_dict())
        merger = Merger(base, deltas, num_layers=config.num_hidden_layers, out=model.state_dict())
        t1 = time.perf_counter()
        merger.merge(recipe.merge, seed=recipe.seed)
        t2 = time.perf_counter()
        value = sum(float(block_nlls(model, blocks, bs).mean()) for blocks in valid.values()) / len(valid)
        t3 = time.perf_counter()
        return value, {"load_s": t1 - t0, "merge_s": t2 - t1, "eval_s": t3 - t2, "total_s": t3 - t0}

    ev.evaluate(recipes[0].to_dict())  # warm-up, as a running actor is
    from_disk(recipes[0])  # warm-up: page cache and imports, in favour of the baseline
    resident, reload, diffs = [], [], []
    for r in recipes:  # interleaved, so drift in machine load hits both the same
        t0 = time.perf_counter()
        res = ev.evaluate(r.to_dict())
        total = time.perf_counter() - t0
        assert res["status"] == "ok", res
        resident.append({"merge_s": res["timings"]["merge_s"], "eval_s": res["timings"]["eval_s"], "total_s": total})
        value, t = from_disk(r)
        reload.append(t)
        diffs.append(abs(value - mean_logppl(res["metrics"])))
    diff = max(diffs)
    assert diff < 1e-5, f"resident and reloaded fitness differ by {diff}"

    def m(rows, k):
        return statistics.mean(x[k] for x in rows)

    return {
        "candidates": len(recipes),
        "resident": {k: m(resident, k) for k in resident[0]},
        "reload": {k: m(reload, k) for k in reload[0]},
        "speedup": m(reload, "total_s") / m(resident, "total_s"),
        "materialise_speedup": (m(reload, "load_s") + m(reload, "merge_s")) / m(resident, "merge_s"),
        "max_fitness_diff": diff,
    }


# ----------------------------------------------------------------------------- report
# ----------------------------------------------------------------------------- busy fraction
def straggling_evaluator(every: int, factor: float) -> type:
    """An ``Evaluator`` of which one recipe in ``every`` (by a hash of its key, so the same ones
    in every mode) takes ``factor`` times as long, as on a slower or shared GPU; such a result
    says how long it was held back (``timings.straggler_s``).

    Defined in this function, the class is one cloudpickle cannot import by name, so Ray ships
    it to the workers by value: a worker needs ``evo`` (the base class), not this script on its
    ``sys.path``."""
    import hashlib

    from evo.scoring.evaluator import Evaluator
    from evo.search.recipe import Recipe

    class StragglingEvaluator(Evaluator):
        def evaluate(self, recipe: dict, *args, **kwargs) -> dict:
            t0 = time.perf_counter()
            out = super().evaluate(recipe, *args, **kwargs)
            key = Recipe.from_dict(recipe).key()
            if out["status"] in ("ok", "rejected") and int(hashlib.sha1(key.encode()).hexdigest(), 16) % every == 0:
                held = (factor - 1.0) * (time.perf_counter() - t0)
                time.sleep(held)  # the emulated slow device: the actor is busy, as on a slower GPU
                out["timings"]["straggler_s"] = held
            return out

    return StragglingEvaluator


def busy_fraction(run_dir: Path, evaluators: int) -> dict:
    """Sum of job seconds (sent to result back, at the driver) over evaluators x the search's
    wall time (first job sent to last result back), from the run's fitness cache: every job of
    the search (candidates, each draw's control, elite re-scores) is in it with its ``dispatch``."""
    from evo.artifacts.store import RunStore

    jobs = [r["dispatch"] for r in RunStore.open(run_dir).cache_load().values() if r.get("dispatch")]
    wall = max(j["end"] for j in jobs) - min(j["start"] for j in jobs)
    busy = sum(j["end"] - j["start"] for j in jobs)
    return {"jobs": len(jobs), "wall_s": wall, "busy_s": busy, "busy": busy / (evaluators * wall)}


def bench_busy(zoo: str, generations: int, population: int, evaluators: int, repeats: int,
               straggler: str) -> list[dict]:
    """``evo.run`` on the tiny zoo (CMA-ES, early rejection on: evo's defaults), synchronous and
    asynchronous, without and with an emulated straggler (``straggler`` = "EVERY:FACTOR": one
    recipe in EVERY takes FACTOR times as long, :func:`straggling_evaluator`), alternating the
    modes so machine load hits both alike."""
    import evo
    from evo.artifacts.store import RunStore

    every, factor = straggler.split(":")
    slowed = straggling_evaluator(int(every), float(factor))
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    for rep in range(repeats):
        for slow in ("", straggler):
            for mode in (("sync", "async") if rep % 2 == 0 else ("async", "sync")):
                cfg = {"name": "bench-busy", "zoo": zoo, "search_space": str(LAYERWISE), "eval": dict(EVAL), "seed": rep,
                       "optimizer": {"name": "cmaes", "generations": generations, "population": population,
                                     "async": mode == "async"},
                       "ray": {"evaluators": evaluators, "cpus_per_evaluator": 1, "threads_per_evaluator": 1,
                               "dashboard": False}}
                run_dir = root / f"{mode}-{rep}-{'slow' if slow else 'even'}"
                t0 = time.perf_counter()
                result = evo.run(cfg, run_dir, quiet=True, evaluator_class=slowed if slow else None)
                elapsed = time.perf_counter() - t0
                cands = RunStore.open(run_dir).candidates()
                row = {"mode": mode, "repeat": rep, "straggler": slow or "none", "run_s": elapsed,
                       **busy_fraction(run_dir, evaluators),
                       "rejected": sum(c["status"] == "rejected" for c in cands), "candidates": len(cands),
                       "best": result.best_values[0],
                       "stragglers": sum(1 for c in cands if (c.get("timings") or {}).get("straggler_s"))}
                print(f"  {mode:5s} repeat {rep} straggler {row['straggler']}: busy {100 * row['busy']:.1f}% "
                      f"({row['jobs']} jobs, {row['wall_s']:.1f} s search wall), {row['rejected']} rejected, "
                      f"{row['stragglers']} slowed, best {row['best']:.4f}", flush=True)
                rows.append(row)
    return rows


def busy_table(rows: list[dict], args) -> str:
    lines = [f"Tiny zoo, CMA-ES {args.generations} generations x {args.population}, {args.evaluators} evaluators, "
             f"early rejection on, {EVAL['max_blocks']} blocks x {EVAL['seq_len']} tokens per domain; "
             f"{args.repeats} repeats per cell (median [min-max]); straggler = one recipe in "
             f"{args.straggler.split(':')[0]} takes {args.straggler.split(':')[1]}x as long.",
             "", md_head("straggler", "synchronous busy", "asynchronous busy", "async / sync",
                         "search wall sync -> async")]
    for slow in ("none", args.straggler):
        cell = {m: [r for r in rows if r["mode"] == m and r["straggler"] == slow] for m in ("sync", "async")}
        med = {m: statistics.median(r["busy"] for r in v) for m, v in cell.items()}
        wall = {m: statistics.median(r["wall_s"] for r in v) for m, v in cell.items()}

        def spread(v):
            return f"{100 * min(r['busy'] for r in v):.1f}-{100 * max(r['busy'] for r in v):.1f}"

        lines.append(md_row(slow, f"{100 * med['sync']:.1f}% [{spread(cell['sync'])}]",
                            f"**{100 * med['async']:.1f}%** [{spread(cell['async'])}]", f"{med['async'] / med['sync']:.3f}",
                            f"{wall['sync']:.1f} s -> {wall['async']:.1f} s"))
    return "\n".join(lines) + "\n"


def table(ray_rows: list[dict], reload: dict, n: int) -> str:
    by = {1: [r for r in ray_rows if r["evaluators"] == 1], 2: [r for r in ray_rows if r["evaluators"] == 2]}
    med = {k: statistics.median(r["per_minute"] for r in v) for k, v in by.items()}
    speedup = med[2] / med[1]
    pairs = [b["per_minute"] / a["per_minute"] for a, b in zip(by[1], by[2])]
    lines = [
        f"Tiny zoo, `task_arithmetic_layerwise` (12 genes), {n} random candidates; "
        f"evaluation: 3 domains x {EVAL['max_blocks']} blocks x {EVAL['seq_len']} tokens; 1 torch thread per process.",
        "",
        md_head("measurement", "1 evaluator", "2 evaluators", "goal"),
        f"| candidates / minute (median of {len(by[1])}) | {med[1]:.1f} | {med[2]:.1f} | |",
        f"| speed-up 2 vs 1 | | **{speedup:.2f}x** (runs: {', '.join(f'{p:.2f}' for p in pairs)}) | >= 1.6x |",
        f"| wall per candidate at the driver (median run) | {1e3 * statistics.median(r['mean_wall_s'] for r in by[1]):.0f} ms "
        f"| {1e3 * statistics.median(r['mean_wall_s'] for r in by[2]):.0f} ms | |",
        f"| merge / forward passes per candidate | {1e3 * statistics.median(r['mean_merge_s'] for r in by[1]):.0f} / "
        f"{1e3 * statistics.median(r['mean_eval_s'] for r in by[1]):.0f} ms | "
        f"{1e3 * statistics.median(r['mean_merge_s'] for r in by[2]):.0f} / "
        f"{1e3 * statistics.median(r['mean_eval_s'] for r in by[2]):.0f} ms | |",
        f"| overhead (wall - merge - eval) / wall | {100 * statistics.median(r['overhead_share'] for r in by[1]):.1f}% "
        f"(median {statistics.median(r['overhead_ms_median'] for r in by[1]):.1f} ms) | "
        f"{100 * statistics.median(r['overhead_share'] for r in by[2]):.1f}% "
        f"(median {statistics.median(r['overhead_ms_median'] for r in by[2]):.1f} ms) | < 10% |",
        f"| pool start-up (Ray already up; actors built) | {statistics.median(r['startup_s'] for r in by[1]):.1f} s "
        f"| {statistics.median(r['startup_s'] for r in by[2]):.1f} s | |",
        "",
        md_head("per candidate, one process, no Ray (interleaved)", "materialise the model", "forward passes", "total"),
        f"| resident `Evaluator` (merge in place) | {1e3 * reload['resident']['merge_s']:.1f} ms | "
        f"{1e3 * reload['resident']['eval_s']:.0f} ms | {1e3 * reload['resident']['total_s']:.0f} ms |",
        f"| reload from disk (load 4 models + task vectors + fresh model: {1e3 * reload['reload']['load_s']:.0f} ms; "
        f"merge: {1e3 * reload['reload']['merge_s']:.1f} ms) | {1e3 * (reload['reload']['load_s'] + reload['reload']['merge_s']):.0f} ms | "
        f"{1e3 * reload['reload']['eval_s']:.0f} ms | {1e3 * reload['reload']['total_s']:.0f} ms |",
        f"| **speed-up of resident models** | **{reload['materialise_speedup']:.0f}x** | | **{reload['speedup']:.2f}x** |",
        "",
        f"Same fitness both ways: max |difference| of mean log-perplexity = {reload['max_fitness_diff']:.1e} over {reload['candidates']} candidates.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--candidates", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="alternating 1- and 2-actor measurements")
    p.add_argument("--reload-candidates", type=int, default=None, help="default: all candidates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-blocks", type=int, default=EVAL["max_blocks"], help="evaluation blocks per domain")
    p.add_argument("--batch-size", type=int, default=EVAL["batch_size"])
    p.add_argument("--quick", action="store_true", help="12 candidates, 1 repeat")
    p.add_argument("--dtypes", default=None,
                   help="compare resident-model dtypes instead, e.g. float32,bfloat16 (first = reference)")
    p.add_argument("--seq-len", type=int, default=EVAL["seq_len"], help="tokens per block (--dtypes)")
    p.add_argument("--busy", action="store_true",
                   help="evaluator busy fraction, synchronous vs asynchronous search (evo.run, early rejection on)")
    p.add_argument("--generations", type=int, default=8, help="--busy: generations per run")
    p.add_argument("--population", type=int, default=12, help="--busy: candidates per generation")
    p.add_argument("--evaluators", type=int, default=2, help="--busy: evaluator actors")
    p.add_argument("--straggler", default="8:4", help="--busy: EVERY:FACTOR, one recipe in EVERY is FACTOR x slower")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.repeats = min(args.candidates, 12), 1
    EVAL.update(max_blocks=args.max_blocks, batch_size=args.batch_size)
    if not zoo_ready(args.zoo, "bench_runner"):
        return 2
    from evo.loop.selection import baseline_recipes

    t0 = time.time()
    cfg = make_config(args.zoo)
    recipes = random_recipes(cfg, args.candidates, args.seed)
    if args.dtypes:
        text = bench_dtype(args.zoo, recipes, args.dtypes.split(","), args.seq_len)
        text += f"\nWall time {time.time() - t0:.0f} s; load average at the end: {os.getloadavg()[0]:.2f}.\n"
        print(text)
        write_text(Path(args.out) / "bench_dtype.md", text)
        return 0
    if args.busy:
        print("busy fraction, synchronous vs asynchronous:", flush=True)
        rows = bench_busy(args.zoo, args.generations, args.population, args.evaluators, args.repeats, args.straggler)
        text = busy_table(rows, args)
        text += f"\nWall time {time.time() - t0:.0f} s; load average at the end: {os.getloadavg()[0]:.2f}.\n"
        print(text)
        write_text(Path(args.out) / "bench_busy.md", text)
        write_json(Path(args.out) / "bench_busy.json", rows)
        return 0
    warmup = list(baseline_recipes(cfg).values())
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("Ray throughput:", flush=True)
    ray_rows = bench_ray(args.zoo, recipes, warmup, args.repeats)
    # both pools scored the same recipes: the fitness must not depend on the actor count
    v1, v2 = ray_rows[0]["values"], ray_rows[1]["values"]
    assert all(abs(v1[k] - v2[k]) < 1e-6 for k in v1), "1- and 2-actor fitness differ"
    print("resident vs reload:", flush=True)
    reload = bench_reload(args.zoo, recipes[: args.reload_candidates or len(recipes)])
    text = table(ray_rows, reload, args.candidates)
    text += f"\nWall time of the benchmark: {time.time() - t0:.0f} s; load average at the end: {os.getloadavg()[0]:.2f}.\n"
    print()
    print(text)
    write_text(Path(args.out) / "bench_runner.md", text)
    for r in ray_rows:
        r.pop("values")
    write_json(Path(args.out) / "bench_runner.json", {"ray": ray_rows, "reload": reload, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
