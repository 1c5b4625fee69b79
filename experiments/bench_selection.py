"""Racing selection vs scoring every selection candidate on every block (issue 26, item 1).

    python experiments/bench_selection.py                          # 5 seeds, tiny zoo, racing on and off
    python experiments/bench_selection.py --seeds 2 --generations 2  # a quick look

For each seed the same search runs twice through ``evo.run`` (generation-synchronous, so both
runs search identically: checked), once with ``eval.selection.racing: true`` (the default) and
once with ``false``; the two differ only in how the selection stage scores the selection split.
Which mode runs first alternates with the seed (a machine whose load drifts favours neither).
Per run the table gives the selection split's wall time (the race's own clock: scoring the
selection split, not the test-split comparison after it), the candidate-blocks scored, how many
candidates were dropped, the release, whether racing changed the pick, and the release's margin
over the best simple baseline on the test split (paired 95% interval). Outputs
``experiments/out/bench_selection.md`` / ``.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import LAYERWISE, OUT, ROOT, local_ray, md_head, md_row, save_runs, write_text, zoo_ready


def config(zoo: str, seed: int, racing: bool, args) -> dict:
    """The experiment: the quickstart's evaluation at the default selection settings, a short
    synchronous CMA-ES search (its cost is not what is measured)."""
    return {
        "name": f"selection-s{seed}-{'race' if racing else 'full'}",
        "zoo": zoo, "search_space": str(LAYERWISE),
        "eval": {"seq_len": 128, "max_blocks": args.search_blocks, "batch_size": args.batch_size,
                 "selection": {"blocks": args.selection_blocks, "racing": racing, "racing_rounds": args.rounds},
                 "test_blocks": args.selection_blocks},
        "optimizer": {"name": "cmaes", "generations": args.generations, "population": args.population,
                      "async": False},
        "ray": {"evaluators": args.evaluators, "dashboard": False},
        "seed": seed,
        "dtype": "float32",
    }


def run_one(zoo: str, seed: int, racing: bool, args) -> dict:
    import evo

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = evo.run(config(zoo, seed, racing, args), Path(tmp) / "run", quiet=True)
    sel = result.selection
    race = sel["race"]
    margin = sel["margins"].get("release_vs_best_baseline/test")
    return {
        "seed": seed, "racing": racing, "run_s": time.time() - t0,
        "selection_s": race["seconds"], "release_step_s": (result.time.get("steps_s") or {}).get("selection"),
        "blocks_scored": race["blocks_scored"], "blocks_full": race["blocks_full"],
        "dropped": len(race["dropped"]),
        "release": sel["release"], "release_kind": sel["release_kind"], "best_baseline": sel["best_baseline"],
        "search_best": result.best_recipe.key(), "margin_test": margin,
    }


def interval(m: dict | None) -> str:
    return f"{m['mean']:+.4f} [{m['lo']:+.4f}, {m['hi']:+.4f}]" if m else "–"


def table(runs: list[dict], args) -> str:
    lines = [
        f"Tiny zoo (en, de, code), float32, CMA-ES {args.generations} generations x {args.population} "
        f"(synchronous), {args.search_blocks} search blocks, {args.selection_blocks} selection and test blocks x 128 "
        f"tokens per set, {args.evaluators} evaluators; racing {args.rounds} rounds. Δ test = release − best simple "
        "baseline on the test split (paired 95% interval; negative: the release is better).",
        "",
        md_head("seed", "selection", "selection split wall (s)", "candidate-blocks scored", "dropped", "released",
                "pick changed", "Δ test", align="rlrrr"),
    ]
    by_seed: dict[int, dict[bool, dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["racing"]] = r
    for seed, pair in sorted(by_seed.items()):
        full = pair.get(False)
        for racing in (False, True):
            r = pair.get(racing)
            if r is None:
                continue
            changed = "–" if not racing or full is None else ("**yes**" if r["release"] != full["release"] else "no")
            lines.append(md_row(seed, "racing" if racing else "full", f"{r['selection_s']:.1f}",
                                f"{r['blocks_scored']:,} of {r['blocks_full']:,}", r["dropped"], r["release"], changed,
                                interval(r["margin_test"])))
    pairs = [p for p in by_seed.values() if True in p and False in p]
    if pairs:
        wall = [p[True]["selection_s"] / p[False]["selection_s"] for p in pairs]
        blocks = [p[True]["blocks_scored"] / p[False]["blocks_scored"] for p in pairs]
        changed = sum(p[True]["release"] != p[False]["release"] for p in pairs)
        same_search = sum(p[True]["search_best"] == p[False]["search_best"] for p in pairs)
        lines += ["", f"Racing / full, median [min–max] over {len(pairs)} seeds: selection-split wall "
                      f"{statistics.median(wall):.0%} [{min(wall):.0%}–{max(wall):.0%}], candidate-blocks "
                      f"{statistics.median(blocks):.0%} [{min(blocks):.0%}–{max(blocks):.0%}]; pick changed in "
                      f"{changed} of {len(pairs)} seeds; identical searches in {same_search} of {len(pairs)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--search-blocks", type=int, default=16, help="search blocks per set per candidate")
    p.add_argument("--selection-blocks", type=int, default=64, help="selection (and test) blocks per set")
    p.add_argument("--rounds", type=int, default=4, help="eval.selection.racing_rounds")
    p.add_argument("--evaluators", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if not zoo_ready(args.zoo, "bench_selection"):
        return 2
    out = Path(args.out)
    runs: list[dict] = []
    t0 = time.time()
    with local_ray():
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for racing in ((True, False) if seed % 2 == 0 else (False, True)):
                r = run_one(args.zoo, seed, racing, args)
                runs.append(r)
                print(f"seed {seed} {'racing' if racing else 'full'}: selection split {r['selection_s']:.1f}s, "
                      f"{r['blocks_scored']} of {r['blocks_full']} blocks, released {r['release']} "
                      f"(run {r['run_s']:.0f}s)", flush=True)
                save_runs(out / "bench_selection.json", args, runs)
    text = table(runs, args)
    text += f"\n{time.time() - t0:.0f} s in all.\n"
    write_text(out / "bench_selection.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
