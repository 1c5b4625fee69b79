"""Parameter space vs data-flow space vs both, on the test split (issue 24, deliver 4).

    python experiments/bench_dataflow.py --zoo zoo --seeds 3                 # the tiny zoo
    python experiments/bench_dataflow.py --zoo zoo-smollm2 --label "SmolLM2-135M zoo (de, fr, code)" \\
        --seeds 3 --generations 6 --population 12 --heldout-blocks 16 --batch-size 8

Each run is ``experiments/bench_heldout.py``'s run (``evo.run`` as a user would, local Ray, two
evaluators, CMA-ES from the best-λ start, selection split, comparison on the zoo's test split),
with the same budget (generations × population, blocks per candidate) in each space:

- ``parameter``: ``search_spaces/task_arithmetic_layerwise.yaml`` (evo's default space);
- ``data-flow``: ``search_spaces/dataflow_layers.yaml`` (which model's layer each slot runs, or
  none, and its residual scale; no weight merged);
- ``both``: ``search_spaces/dataflow_merged.yaml`` (the layer-wise task arithmetic merge, then a
  path of up to two passes over its layers).

The table gives, per space, the release's test log-perplexity, its margin over the best simple
baseline chosen on selection (test split), how often the release beat it, how often an evolved
recipe was released, the released model's depth, and the forward cost of a search candidate
(median seconds of perplexity scoring per candidate: a deeper path costs more).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import LAYERWISE, OUT, ROOT, local_ray, md_head, md_row, save_runs, signed, spread, write_text, zoo_ready
from bench_heldout import run_one

SPACES = {
    "parameter": LAYERWISE,
    "data-flow": ROOT / "search_spaces" / "dataflow_layers.yaml",
    "both": ROOT / "search_spaces" / "dataflow_merged.yaml",
}


def table(runs: list[dict], args) -> str:
    lines = [
        f"{args.label}, {args.dtype}, CMA-ES from the best-λ start, {args.generations} generations × "
        f"{args.population}, {args.blocks} search blocks/set, {args.evaluators} evaluators; test = mean "
        f"log-perplexity on {args.heldout_blocks} blocks × 128 tokens per domain of the zoo's test split (never "
        f"seen by search or selection); median [min–max] over seeds {args.seeds_list}. Δ = release − best simple "
        "baseline (chosen on selection), on test; negative: the release is better.",
        "",
        md_head("space", "release (test)", "search's best (test)", "best simple baseline (test)",
                "Δ release − best baseline", "release beats it", "evolved released", "release depth",
                "forward s / candidate", "run wall s", align="lllllrrlrr"),
    ]
    for name in args.space_list:
        group = [r for r in runs if r["space_label"] == name]
        if not group:
            continue
        delta = [r["test"]["release"] - r["test"]["best_baseline"] for r in group]
        depths = sorted({r["release_depth"] for r in group if r["release_depth"]})
        cost = [r["ppl_s_per_candidate"] for r in group if r["ppl_s_per_candidate"]]
        lines.append(md_row(
            name, spread([r["test"]["release"] for r in group]), spread([r["test"]["search_best"] for r in group]),
            spread([r["test"]["best_baseline"] for r in group]), signed(delta), f"{sum(d < 0 for d in delta)}/{len(group)}",
            f"{sum(r['release_kind'] == 'evolved' for r in group)}/{len(group)}", ", ".join(map(str, depths)) or "base depth",
            f"{statistics.median(cost):.2f}", f"{statistics.median(r['seconds'] for r in group):.0f}"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--spaces", default=",".join(SPACES), help=f"comma-separated, from {', '.join(SPACES)}")
    p.add_argument("--blocks", type=int, default=8, help="search blocks per set per candidate")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--optimizer", default="cmaes")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--evaluators", type=int, default=2)
    p.add_argument("--heldout-blocks", type=int, default=64, help="selection and test blocks per set")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--label", default="Tiny zoo (en, de, code)")
    p.add_argument("--from-json", nargs="*", default=None, metavar="FILE",
                   help="no runs: the table of runs saved in these bench_dataflow.json files (e.g. one per seed)")
    p.add_argument("--out", default=str(OUT / "bench_dataflow.json"))
    args = p.parse_args(argv)
    args.space_list = args.spaces.split(",")
    args.seeds_list = list(range(args.first_seed, args.first_seed + args.seeds))
    args.start = "best_lambda"
    unknown = [s for s in args.space_list if s not in SPACES]
    if unknown:
        print(f"bench_dataflow: unknown space {unknown[0]!r} (known: {', '.join(SPACES)})", file=sys.stderr)
        return 2
    if args.from_json:
        runs = [r for f in args.from_json for r in json.loads(Path(f).read_text())["runs"]]
        args.seeds_list = sorted({r["seed"] for r in runs})
        print(table(runs, args))
        return 0
    if not zoo_ready(args.zoo, "bench_dataflow"):
        return 2
    out = Path(args.out)
    runs, t0 = [], time.time()
    with local_ray():
        for seed in args.seeds_list:
            for name in args.space_list:
                r = run_one(args.zoo, args.blocks, seed, True, args, space=SPACES[name])
                r["space_label"] = name
                runs.append(r)
                print(f"seed {seed} {name:9s}: release {r['release'][:38]:38s} test {r['test']['release']:.4f}  "
                      f"best baseline {r['test']['best_baseline']:.4f} ({r['best_baseline']})  depth "
                      f"{r['release_depth'] or '-'}  {r['ppl_s_per_candidate'] or 0:.2f} s/cand  {r['seconds']:.0f}s",
                      flush=True)
                save_runs(out, args, runs)
    text = table(runs, args) + f"\nWall time {time.time() - t0:.0f} s.\n"
    print()
    print(text)
    write_text(out.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
