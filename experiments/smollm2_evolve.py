"""Evolve layer-wise task-arithmetic merges of the SmolLM2-135M specialists, export the winner,
and let plain transformers continue a prompt in each domain with it.

    nice -n 19 python experiments/smollm2_zoo.py --out zoo-smollm2 --steps 30 --seq-len 128 --batch-size 4
    nice -n 19 python experiments/smollm2_evolve.py --zoo zoo-smollm2 --generations 2 --population 4 \\
        --seq-len 128 --max-blocks 4 --eval-batch-size 4

The objective is the mean held-out log-perplexity over the zoo's domains (valid split; the final
comparison table uses the test split). ``--layer-groups`` overrides the search space's anchor
count: a copy of the space with that value is written next to the run directory, because the run
records the space by path and ``evo.export`` reads it again.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import yaml

from _common import LAYERWISE, ROOT, md_head, md_row, write_text

# A continuation prompt per domain; other domains use the start of their first test document.
PROMPTS = {
    "de": "Im Anfang schuf Gott",
    "fr": "Au commencement, Dieu créa",
    "en": "In the beginning God created",
    "code": "def read_config(path):\n",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", default="zoo-smollm2", help="zoo built by experiments/smollm2_zoo.py")
    p.add_argument("--space", default=str(LAYERWISE))
    p.add_argument("--layer-groups", type=int, default=None, help="override the space's layer_groups")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--optimizer", default="ga", help="ga, nsga2, cmaes or random (default: ga)")
    p.add_argument("--evaluators", type=int, default=2, help="Ray evaluator actors (each holds one model)")
    p.add_argument("--threads-per-evaluator", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256, help="eval block length in tokens")
    p.add_argument("--max-blocks", type=int, default=8, help="eval blocks per domain")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--selection-blocks", type=int, default=None,
                   help="blocks per domain of the selection split the release is chosen on (default: evo's, 64)")
    p.add_argument("--test-blocks", type=int, default=None, help="blocks per domain of the test split (default: evo's, 64)")
    p.add_argument("--task", action="append", default=[], metavar="NAME=YAML",
                   help="a task (evo.scoring.tasks YAML) to score and optimise too (an objective each); repeatable")
    p.add_argument("--task-weight", type=float, default=1.0,
                   help="weight of each task objective against the mean log-perplexity (weight 1)")
    p.add_argument("--task-limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--task-subset", type=int, default=None,
                   help="search on N evenly spaced items of each task; the comparison scores all (eval.task_subset)")
    p.add_argument("--subset", type=float, default=1.0,
                   help="search on this fraction of the eval blocks; the comparison uses all (eval.subset)")
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="Ray object store size (default: sized from the zoo's weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="default: runs/smollm2-<time>")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-dashboard", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-generation table or comparison")
    return p.parse_args(argv)


def make_config(args, zoo, space_path: Path) -> dict:

    config = {
        "name": "smollm2-evolve",
        "zoo": str(zoo.root),
        "search_space": str(space_path),
        "eval": {"seq_len": args.seq_len, "max_blocks": args.max_blocks, "batch_size": args.eval_batch_size,
                 "subset": args.subset,
                 **({"selection": {"blocks": args.selection_blocks}} if args.selection_blocks else {}),
                 **({"test_blocks": args.test_blocks} if args.test_blocks else {})},
        "objectives": [{"name": "mean_logppl", "metric": "logppl", "reduce": "mean", "goal": "minimize"}],
        "optimizer": {"name": args.optimizer, "generations": args.generations, "population": args.population},
        "ray": {"evaluators": args.evaluators, "cpus_per_evaluator": 1,
                "threads_per_evaluator": args.threads_per_evaluator, "dashboard": not args.no_dashboard,
                "object_store_mb": args.object_store_mb or _object_store_mb(zoo)},
        "seed": args.seed,
    }
    # --task NAME=YAML adds task scores; each becomes an objective (maximise) next to the mean
    # log-perplexity, scalarised by --task-weight (CMA-ES/GA) or kept as a front (nsga2)
    if args.task:
        tasks = {}
        for item in args.task:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"smollm2_evolve: --task expects NAME=YAML, got {item!r}")
            tasks[name] = str(Path(path).resolve())
        config["eval"]["tasks"] = tasks
        if args.task_limit:
            config["eval"]["task_limit"] = args.task_limit
        if args.task_subset:
            config["eval"]["task_subset"] = args.task_subset
        config["objectives"] += [{"name": f"task_{n}", "metric": "task", "sets": [n], "goal": "maximize",
                                  "weight": args.task_weight} for n in tasks]
    return config


def _object_store_mb(zoo) -> int:
    """Room for the base and every task vector (float32, as on disk) plus headroom."""
    dirs = [zoo.base_dir, *zoo.specialist_dirs.values()]
    weights = sum(f.stat().st_size for d in dirs for f in Path(d).glob("*.safetensors"))
    return int(weights * 1.25 / 2**20) + 512


def space_with_groups(space: Path, groups: int | None, out_dir: Path) -> Path:
    """``space`` itself, or a copy with ``layer_groups: groups`` in ``out_dir``."""
    if groups is None:
        return space.resolve()
    data = yaml.safe_load(space.read_text(encoding="utf-8"))
    data["layer_groups"] = int(groups)
    data["description"] = f"{data.get('description', '')} (layer_groups overridden to {groups})".strip()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{space.stem}.groups{groups}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def candidate_timing(run_dir: Path, logbook: list[dict], evaluators: int) -> dict:
    """Per-candidate cost from the run's fitness cache (each result carries its evaluator's
    merge and scoring seconds) and steady-state wall time from the generations after the first,
    whose wall time includes starting the evaluators and shipping the weights to them."""
    merge, score, rss = [], [], [0]
    with (run_dir / "cache.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            result = json.loads(line).get("result", {})
            rss.append((result.get("worker") or {}).get("peak_rss_mb", 0))
            if result.get("status") == "ok" and "timings" in result:
                merge.append(result["timings"].get("merge_s", 0.0))
                score.append(result["timings"].get("eval_s", 0.0))
    later = [r for r in logbook[1:] if r.get("evals")]
    steady = sum(r["seconds"] for r in later) / sum(r["evals"] for r in later) if later else None
    n = max(1, len(merge))
    return {"candidates": len(merge), "merge_s": sum(merge) / n, "eval_s": sum(score) / n,
            "first_generation_s": logbook[0].get("seconds") if logbook else None,
            "steady_wall_s_per_candidate": round(steady, 2) if steady is not None else None,
            "evaluators": evaluators, "evaluator_peak_rss_mb": max(rss)}


def comparison_table(comparison: dict, domains: list[str], objectives: list[dict]) -> tuple[str, dict]:
    """The final comparison (test split) as a markdown table: perplexity per domain, mean
    log-perplexity, task accuracy, and the combined objective the search scalarised:
    mean log-ppl - sum(weight * task accuracy) (lower is better). Also returns the rows."""
    tasks = [o for o in objectives if o["metric"] == "task"]
    weights = {o["name"]: o.get("weight", 1.0) for o in objectives}
    ppl_weight = weights.get("mean_logppl", 1.0)
    rows = {}
    for label, colls in comparison.items():
        m = colls.get("test") or colls.get("selection") or colls.get("valid") or {}
        if not m or "error" in m:
            continue
        row = {d: math.exp(m[f"logppl/{d}"]) for d in domains}
        row["mean log-ppl"] = m["mean"]
        for o in tasks:
            row[o["name"]] = m[f"task/{o['sets'][0]}"]
        row["combined"] = ppl_weight * m["mean"] - sum(weights[o["name"]] * row[o["name"]] for o in tasks)
        rows[label] = row
    cols = [*domains, "mean log-ppl", *[o["name"] for o in tasks], "combined"]
    higher = {o["name"] for o in tasks}
    best = {c: (max if c in higher else min)(r[c] for r in rows.values()) for c in cols}

    def cell(c, v):
        text = f"{100 * v:.1f}%" if c in higher else (f"{v:.2f}" if c in domains else f"{v:.4f}")
        return f"**{text}**" if v == best[c] else text

    lines = [md_head("model", *(f"{c} ppl" if c in domains else c for c in cols), align="l" + "r" * len(cols))]
    lines += [md_row(label, *(cell(c, r[c]) for c in cols)) for label, r in rows.items()]
    return "\n".join(lines), rows


def generate(release: Path, zoo, max_new_tokens: int) -> dict[str, str]:
    """Greedy continuations from the exported release, loaded with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(release).eval()
    tok = AutoTokenizer.from_pretrained(release)
    out = {}
    for domain in zoo.domains:
        prompt = PROMPTS.get(domain) or zoo.texts(domain, "test")[0][:80]
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out[domain] = prompt + tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)

    import evo
    from evo.core.errors import EvoError
    from evo.zoo.build import Zoo

    t0 = time.time()
    run_dir = Path(args.run_dir or ROOT / "runs" / time.strftime("smollm2-%Y%m%d-%H%M%S")).resolve()
    try:
        zoo = Zoo.load(args.zoo)
        space = space_with_groups(Path(args.space), args.layer_groups, run_dir.parent / "spaces")
        config = make_config(args, zoo, space)
        result = evo.run(config, run_dir, quiet=args.quiet)
        t_run = time.time() - t0
        release = evo.export(run_dir)
        t_export = time.time() - t0 - t_run
        samples = generate(release, zoo, args.max_new_tokens)
    except EvoError as exc:
        print(f"smollm2_evolve: error: {exc}", file=sys.stderr)
        return 2

    timing = candidate_timing(run_dir, result.logbook, args.evaluators)
    timing.update(run_seconds=round(t_run, 1), export_seconds=round(t_export, 1),
                  eval={"seq_len": args.seq_len, "max_blocks": args.max_blocks, "domains": zoo.domains,
                        "subset": args.subset, "task_subset": args.task_subset, "task_limit": args.task_limit},
                  driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    ckpt = json.loads((run_dir / "checkpoint.json").read_text(encoding="utf-8"))
    table_md, rows = comparison_table(ckpt.get("comparison", {}), zoo.domains, config["objectives"])
    write_text(run_dir / "smollm2_table.md", table_md + "\n")
    timing["table"] = rows
    best = dict(zip(result.objectives, result.best_values))
    write_text(run_dir / "smollm2_timing.json",
               json.dumps({**timing, "samples": samples}, indent=2, ensure_ascii=False) + "\n")
    print(f"\nsearch's best mean log-perplexity (search blocks, adjusted): {best['mean_logppl']:.4f}")
    print(f"release: {release}")
    print(f"{timing['candidates']} candidates evaluated; per candidate on one evaluator: merge "
          f"{timing['merge_s']:.2f}s + perplexity {timing['eval_s']:.2f}s; generation wall time after the first "
          f"(start-up) generation: {timing['steady_wall_s_per_candidate']} s per candidate with "
          f"{args.evaluators} evaluators; run {t_run:.0f}s, export {t_export:.0f}s")
    print(f"\nComparison (test split; perplexity per domain, task accuracy, combined = mean log-ppl - "
          f"weight x accuracy, lower is better), also in {run_dir / 'smollm2_table.md'}:\n")
    print(table_md)
    print(f"\nevaluator peak RSS {timing['evaluator_peak_rss_mb']} MB, driver {timing['driver_peak_rss_mb']} MB")
    print("\nGreedy continuations from the release (plain transformers):")
    for domain, text in samples.items():
        print(f"--- {domain}\n{text}")
    print(f"\ntotal time: {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
