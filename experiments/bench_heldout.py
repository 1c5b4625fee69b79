"""Held-out benchmark: does the evolved release beat the best simple baseline on text the search
never saw? (``python experiments/bench_search.py --heldout`` runs this too.)

    python experiments/bench_heldout.py                          # blocks 4,8,16 x 5 seeds x 2 modes
    python experiments/bench_heldout.py --blocks 8 --seeds 2     # a quick look
    python experiments/bench_heldout.py --zoo zoo-smollm2 --label "SmolLM2-135M zoo (de, fr, code)" \
        --blocks 8 --modes redraw --dtype bfloat16 --batch-size 8 --heldout-blocks 32 \
        --out experiments/out/heldout-smollm2 --plot docs/img/bench_heldout_smollm2.png

Each run goes through the public API exactly as a user's would (``evo.run`` on a local Ray,
2 evaluators, CMA-ES, ``search_spaces/task_arithmetic_layerwise.yaml``, 8 generations x 16):

- ``redraw`` (evo's default): search blocks drawn afresh each generation from the search pool,
  control-adjusted values, release chosen on the selection split among the hall of fame's top
  k and the simple baselines (uniform, best task-arithmetic lambda on selection, TIES, DARE-TIES).
- ``fixed``: the same blocks every generation (``eval.redraw: false``), as evo did before.

From each run's comparison (test split: the zoo's ``test.jsonl``, never read by the search or
the selection) the table takes the release, the search's own best ("evolved #1"), the best
simple baseline (chosen on selection) and the uniform average. Outputs
``experiments/out/bench_heldout.md`` / ``.json`` and ``docs/img/bench_heldout.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import LAYERWISE, OUT, ROOT, local_ray, md_head, md_row, save_runs, signed, spread, write_text, zoo_ready


def run_one(zoo: str, blocks: int, seed: int, redraw: bool, args, space: Path = LAYERWISE) -> dict:
    import evo
    from evo.artifacts.store import RunStore
    from evo.search.recipe import Recipe

    config = {
        "name": f"heldout-b{blocks}-s{seed}-{'redraw' if redraw else 'fixed'}",
        "zoo": zoo, "search_space": str(space),
        "eval": {"seq_len": 128, "max_blocks": blocks, "batch_size": args.batch_size, "redraw": redraw,
                 "selection": {"blocks": args.heldout_blocks}, "test_blocks": args.heldout_blocks},
        "optimizer": {"name": args.optimizer, "generations": args.generations, "population": args.population,
                      "start": args.start},
        "ray": {"evaluators": args.evaluators, "dashboard": False},
        "seed": seed,
        "dtype": args.dtype,
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = evo.run(config, Path(tmp) / "run", quiet=True)
        # the forward cost of a search candidate (a deeper data-flow path costs more)
        timed = [c["timings"]["ppl_s"] / max(c.get("evaluated_fraction") or 1.0, 1e-9)
                 for c in RunStore.open(Path(tmp) / "run").candidates()
                 if c.get("status") == "ok" and (c.get("timings") or {}).get("ppl_s") is not None]
    sel = result.selection
    released = Recipe.from_dict(sel["release_recipe"]) if sel.get("release_recipe") else None
    depth = len(released.path.steps) if released is not None and released.path else None
    table = sel["table"]

    def test_mean(label):
        return table[label]["test"]["mean"] if label and "test" in table.get(label, {}) else None

    search_best = next(k for k in table if k.startswith("evolved #1"))
    margin = sel["margins"].get("release_vs_best_baseline/test")
    return {
        "blocks": blocks, "seed": seed, "mode": "redraw" if redraw else "fixed", "start": args.start,
        "seconds": time.time() - t0, "space": Path(space).stem, "release_depth": depth,
        "ppl_s_per_candidate": statistics.median(timed) if timed else None,
        "release": sel["release"], "release_kind": sel["release_kind"], "best_baseline": sel["best_baseline"],
        "test": {"release": test_mean(sel["release"]), "search_best": test_mean(search_best),
                 "best_baseline": test_mean(sel["best_baseline"]), "uniform": test_mean("uniform average")},
        "selection": {"release": table[sel["release"]].get("selection", {}).get("mean"),
                      "search_best": table[search_best].get("selection", {}).get("mean"),
                      "best_baseline": table[sel["best_baseline"]].get("selection", {}).get("mean")},
        "search_best_search_value": next(iter(table[search_best].get("search", {}).values()), None),
        "margin_test": margin,
    }


def variant(r: dict) -> str:
    """A run's setting besides blocks and seed: block mode and where the search started."""
    return f"{r['mode']}, start {r.get('start', 'uniform')}"  # runs saved before --start: uniform


def variants(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(variant(r) for r in runs))


def table(runs: list[dict], args) -> str:
    lines = [
        f"{args.label}, {args.dtype}, CMA-ES {args.generations} generations x {args.population}, {args.evaluators} "
        f"evaluators; test = mean log-perplexity on {args.heldout_blocks} blocks x 128 tokens per domain of the zoo's "
        f"test split (never seen by search or selection); median [min–max] over seeds {args.seeds_list}. "
        "Δ = release − best simple baseline on test (negative: the release is better).",
        "",
        md_head("blocks/set", "mode", "release (test)", "search's best (test)", "best simple baseline (test)",
                "uniform (test)", "Δ release − best baseline", "release beats best baseline", "release ≤ uniform",
                "evolved released", align="r"),
    ]
    for blocks in args.blocks_list:
        for mode in variants(runs):
            group = [r for r in runs if r["blocks"] == blocks and variant(r) == mode]
            if not group:
                continue

            def t(k, group=group):
                return [r["test"][k] for r in group]

            delta = [r["test"]["release"] - r["test"]["best_baseline"] for r in group]
            beats = sum(d < 0 for d in delta)
            le_uniform = sum(r["test"]["release"] <= r["test"]["uniform"] + 1e-12 for r in group)
            evolved = sum(r["release_kind"] == "evolved" for r in group)
            lines.append(md_row(blocks, mode, spread(t("release")), spread(t("search_best")), spread(t("best_baseline")),
                                spread(t("uniform")), signed(delta), f"{beats}/{len(group)}", f"{le_uniform}/{len(group)}",
                                f"{evolved}/{len(group)}"))
    lines += ["", "Search's own best vs the release, same runs: Δ test (search's best − release), median [min…max]:", ""]
    for blocks in args.blocks_list:
        for mode in variants(runs):
            group = [r for r in runs if r["blocks"] == blocks and variant(r) == mode]
            if group:
                lines.append(f"- {blocks} blocks, {mode}: "
                             + signed([r["test"]["search_best"] - r["test"]["release"] for r in group]))
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = variants(runs)
    for i, mode in enumerate(kinds):
        for j, blocks in enumerate(args.blocks_list):
            d = [r["test"]["release"] - r["test"]["best_baseline"] for r in runs if r["blocks"] == blocks and variant(r) == mode]
            if d:
                x = j + (i - (len(kinds) - 1) / 2) * 0.3
                ax.scatter([x] * len(d), d, color=f"C{i}", label=mode if j == 0 else None, alpha=0.8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlim(-0.5, len(args.blocks_list) - 0.5)
    ax.set_xticks(range(len(args.blocks_list)), [f"{b} blocks/set" for b in args.blocks_list])
    ax.set_ylabel("test Δ: release − best simple baseline (nats)")
    ax.set_title("Held-out margin per seed (below 0: evolved release wins)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--blocks", default="4,8,16", help="search blocks per set per candidate, comma-separated")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--modes", default="fixed,redraw")
    p.add_argument("--optimizer", default="cmaes")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--evaluators", type=int, default=2)
    p.add_argument("--heldout-blocks", type=int, default=64, help="selection and test blocks per set")
    p.add_argument("--start", default="uniform", help="optimizer.start: uniform or best_lambda")
    p.add_argument("--dtype", default="float32", help="the evaluators' dtype (float32, bfloat16, auto)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation blocks per forward pass")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--label", default="Tiny zoo (en, de, code)", help="the zoo's name in the table")
    p.add_argument("--from-json", nargs="*", default=None, metavar="FILE",
                   help="no runs: the table and plot of runs saved in these bench_heldout.json files")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "bench_heldout.png"))
    args = p.parse_args(argv)
    args.blocks_list = [int(b) for b in args.blocks.split(",")]
    args.seeds_list = list(range(args.first_seed, args.first_seed + args.seeds))
    if not zoo_ready(args.zoo, "bench_heldout"):
        return 2
    if args.from_json:
        runs = []
        for f in args.from_json:
            saved = json.loads(Path(f).read_text())
            runs += [{"start": saved["args"].get("start", "uniform"), **r} for r in saved["runs"]]
        args.blocks_list = sorted({r["blocks"] for r in runs})
        args.seeds_list = sorted({r["seed"] for r in runs})
        text = table(runs, args)
        print(text)
        plot(runs, args, Path(args.plot))
        return 0
    out = Path(args.out)
    runs, t0 = [], time.time()
    with local_ray():
        for blocks in args.blocks_list:
            for seed in args.seeds_list:
                for mode in args.modes.split(","):
                    r = run_one(args.zoo, blocks, seed, mode == "redraw", args)
                    runs.append(r)
                    print(f"blocks {blocks:2d} seed {seed} {r['mode']:6s}: release {r['release'][:40]:40s} test "
                          f"{r['test']['release']:.4f}  search-best {r['test']['search_best']:.4f}  best baseline "
                          f"{r['test']['best_baseline']:.4f} ({r['best_baseline']})  uniform {r['test']['uniform']:.4f}  "
                          f"{r['seconds']:.0f}s", flush=True)
                    save_runs(out / "bench_heldout.json", args, runs)
    text = table(runs, args) + f"\nWall time {time.time() - t0:.0f} s on this machine.\n"
    print()
    print(text)
    write_text(out / "bench_heldout.md", text)
    plot(runs, args, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
