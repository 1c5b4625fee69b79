"""Quickstart: build (or reuse) the tiny model zoo, evolve layer-wise merges of its specialists
on a local Ray, print the per-generation table and the final comparison, export the winner.

    python experiments/quickstart.py            # ~5-8 minutes on 2 CPU cores, zoo included
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import LAYERWISE, ROOT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"), help="zoo directory (built if missing)")
    p.add_argument("--size", default="tiny", help="zoo size preset (micro, tiny, small)")
    p.add_argument("--domains", default="en,de,code", help="zoo domains, comma-separated")
    p.add_argument("--space", default=str(LAYERWISE))
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--optimizer", default="cmaes", help="ga, cmaes, nsga2 or random (default: the benchmark winner)")
    p.add_argument("--evaluators", type=int, default=2)
    p.add_argument("--sync", action="store_true",
                   help="generation-synchronous search (reproducible bit for bit; the default is asynchronous)")
    p.add_argument("--seed", type=int, default=0, help="the zoo's seed (a zoo built with another is rebuilt)")
    p.add_argument("--search-seed", type=int, default=None,
                   help="the search's seed (default: --seed); varies the run without rebuilding the zoo")
    p.add_argument("--run-dir", default=None, help="default: runs/quickstart-<time>")
    p.add_argument("--no-dashboard", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import evo
    from evo.core.errors import EvoError
    from evo.zoo.build import build_zoo

    t0 = time.time()
    try:
        zoo = build_zoo(args.zoo, domains=tuple(args.domains.split(",")), size=args.size, seed=args.seed)
        print(f"zoo ready in {time.time() - t0:.0f}s: {zoo.root}")
        config = {
            "name": "quickstart",
            "zoo": str(zoo.root),
            "search_space": args.space,
            "eval": {"seq_len": 128, "max_blocks": 48, "batch_size": 16},
            "objectives": [{"name": "mean_logppl", "metric": "logppl", "reduce": "mean", "goal": "minimize"}],
            "optimizer": {"name": args.optimizer, "generations": args.generations, "population": args.population,
                          "async": not args.sync},
            "ray": {"evaluators": args.evaluators, "cpus_per_evaluator": 1, "threads_per_evaluator": 1,
                    "dashboard": not args.no_dashboard, "object_store_mb": 512},
            "seed": args.seed if args.search_seed is None else args.search_seed,
        }
        run_dir = args.run_dir or str(ROOT / "runs" / time.strftime("quickstart-%Y%m%d-%H%M%S"))
        result = evo.run(config, run_dir, quiet=args.quiet)
        release = evo.export(run_dir)
    except EvoError as exc:
        print(f"quickstart: error: {exc}", file=sys.stderr)
        return 2
    best = dict(zip(result.objectives, result.best_values))
    print(f"\nsearch's best mean log-perplexity (search blocks, adjusted to the first draw): {best['mean_logppl']:.4f}")
    for split, values in result.selection["release_values"].items():
        print(f"release ({result.selection['release']}) on the {split} split: {values['mean_logppl']:.4f}")
    print(f"release: {release}")
    print(f"total time: {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
