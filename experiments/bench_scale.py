"""Scale benchmark: searches over synthetic Llama families at 135M, 360M and 1.1B shapes
(SmolLM2-135M, SmolLM2-360M, TinyLlama-1.1B; ``evo.zoo.synthetic``), fp32 and bf16, 1 and 2
evaluators, each a real ``evo run`` (2 generations x 4 candidates, random search, task
arithmetic layer-wise) in its own process, measured from outside.

    python experiments/bench_scale.py                       # every configuration (~40 min, ~20 GB disk)
    python experiments/bench_scale.py --sizes 135M --dtypes bfloat16 --evaluators 2

For each configuration: the memory plan's node total (``evo plan``; a configuration it refuses
is reported as refused, not run), the peak proportional set size summed over the run's process
tree (driver, Ray daemons, evaluators: the object store's shared pages counted once), the
largest evaluator's and the driver's peak anonymous memory (resident, neither file-backed nor
the object store's shared pages: what one more evaluator costs; the driver's stays near the
models it reads while loading, it keeps no copy of the sources) as multiples of the resident
model's bytes, and per candidate the
evaluators' own merge and forward-pass seconds (``timings`` in the run's cache). Sources are
written once per size in bf16 (as fine-tunes ship); the fp32 configurations widen them.

Writes ``experiments/out/bench_scale.md`` (the table) and ``bench_scale.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import LAYERWISE, OUT, ROOT, md_head, md_row, write_json, write_text

from evo.cluster.memory import GiB, PeakSampler, plan_for
from evo.zoo.synthetic import SHAPES, write_family


def config(base, sources, zoo: Path, dtype: str, evaluators: int) -> dict:
    return {
        "name": "bench-scale",
        "models": {"base": str(base), "sources": {k: str(v) for k, v in sources.items()}},
        "search_space": str(LAYERWISE),
        "seed": 0, "dtype": dtype,
        "eval": {"sets": {d: str(zoo / "data" / d / "valid.jsonl") for d in ("en", "de")},
                 "tokenizer": str(zoo / "tokenizer"), "seq_len": 128, "max_blocks": 4, "batch_size": 4,
                 "redraw": False, "test_blocks": 2,
                 # no selection split; the final comparison at its smallest (the run's shape is what is measured)
                 "selection": {"fraction": 0.0, "lambdas": [0.5]}},
        "optimizer": {"name": "random", "generations": 2, "population": 4},
        "ray": {"evaluators": evaluators, "cpus_per_evaluator": 1, "threads_per_evaluator": 1, "dashboard": False},
    }


def measure(cfg_path: Path, run_dir: Path) -> dict:
    """Run ``evo run`` as a child and sample its process tree's PSS until it exits."""
    child = subprocess.Popen([sys.executable, "-m", "evo.cli", "run", str(cfg_path), "--run-dir", str(run_dir), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    sampler = PeakSampler(child.pid)
    out, err = child.communicate()
    sampler.stop()
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        return {"status": "failed", "error": (err.strip().splitlines() or ["?"])[-1][:200], "wall_s": wall}
    cache = [json.loads(line)["result"] for line in open(run_dir / "cache.jsonl")]
    ok = [r for r in cache if r.get("status") == "ok" and "timings" in r]
    evaluator_pids = {r["worker"]["pid"] for r in cache if r.get("worker")}
    return {
        "status": "ok", "wall_s": wall, "peak_pss": sampler.peak,
        "evaluator_anon": max((sampler.anon.get(p, 0) for p in evaluator_pids), default=0),
        "driver_anon": sampler.anon.get(child.pid, 0),
        "merge_s": statistics.median(r["timings"]["merge_s"] for r in ok),
        "forward_s": statistics.median(r["timings"]["ppl_s"] for r in ok),
        "candidates": len(ok),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="135M,360M,1.1B")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--evaluators", default="1,2")
    ap.add_argument("--zoo", default=str(ROOT / "zoo"), help="tiny zoo: its tokenizer and evaluation text")
    ap.add_argument("--work", default="/tmp/evo-bench-scale", help="model families and runs (large)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import yaml

    from evo.loop.experiment import load_config

    zoo, work = Path(args.zoo), Path(args.work)
    rows = []
    for size in args.sizes.split(","):
        shape = SHAPES[size]
        t0 = time.perf_counter()
        base, sources = write_family(work / size, shape, sources=3, dtype="bfloat16", tokenizer=zoo / "tokenizer")
        print(f"{size}: family ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        for dtype in args.dtypes.split(","):
            for k in map(int, args.evaluators.split(",")):
                cfg = config(base, sources, zoo, dtype, k)
                cfg_path = work / f"{size}-{dtype}-{k}.yaml"
                cfg_path.write_text(yaml.safe_dump(cfg))
                plan = plan_for(load_config(cfg_path))
                row = {"size": size, "params": shape.params, "dtype": dtype, "evaluators": k,
                       "plan": plan.node_bytes, "available": plan.node_available,
                       "model_bytes": shape.params * (4 if dtype == "float32" else 2)}
                if plan.problem():
                    row.update(status="refused", reason=plan.problem())
                else:
                    run_dir = work / "runs" / cfg_path.stem
                    shutil.rmtree(run_dir, ignore_errors=True)
                    row.update(measure(cfg_path, run_dir))
                    shutil.rmtree(run_dir, ignore_errors=True)
                rows.append(row)
                print(_row(row), flush=True)
    table = "\n".join([HEADER, *map(_row, rows)])
    write_text(Path(args.out) / "bench_scale.md", table + "\n")
    write_json(Path(args.out) / "bench_scale.json", rows)
    print("\n" + table)


HEADER = md_head("model", "dtype", "evaluators", "plan (GiB)", "peak PSS (GiB)", "plan / PSS",
                 "evaluator own peak / model bytes", "driver own peak / model bytes", "merge s / cand",
                 "forward s / cand", "status", align="llrrrrrrrrl")


def _row(r: dict) -> str:
    if r.get("status") != "ok":
        return md_row(r["size"], r["dtype"], r["evaluators"], f"{r['plan'] / GiB:.1f}", *["–"] * 6,
                      f"{r['status']}: {r.get('reason') or r.get('error')}")
    return md_row(r["size"], r["dtype"], r["evaluators"], f"{r['plan'] / GiB:.1f}", f"{r['peak_pss'] / GiB:.1f}",
                  f"{r['plan'] / r['peak_pss']:.2f}", f"{r['evaluator_anon'] / r['model_bytes']:.2f}",
                  f"{r['driver_anon'] / r['model_bytes']:.2f}", f"{r['merge_s']:.2f}", f"{r['forward_s']:.2f}", "ok")


if __name__ == "__main__":
    main()
