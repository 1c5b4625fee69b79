"""Shifted held-out benchmark (issue 27): does the release's margin hold on documents the
evaluation sets never drew from, and how much could any recipe of the space gain there?

    python experiments/make_shifted.py --zoo zoo                 # once: zoo/shifted/<domain>.jsonl
    python experiments/bench_shifted.py --zoo zoo --seeds 5 --blocks 8

Per seed:

1. **The user's run**: ``evo.run`` with evo's defaults (layer-wise task arithmetic, CMA-ES from the
   best-λ start, fresh search draws, selection split, ``--blocks`` blocks per set per candidate).
2. **The oracle search**: the same run with the evaluation sets replaced by the shifted text
   itself (``zoo/shifted/<domain>.jsonl``: search and selection both read it). Its release,
   measured on that same text, is the headroom: what a recipe of this space can gain there.
3. Every model below is scored in-process on ``--shifted-blocks`` blocks × 128 tokens per domain of
   the shifted text (the same blocks for all, so differences are paired per block and the
   intervals are stratified by domain: ``evo.data.draws.paired_difference``):

   - ``release``: what the user's run released;
   - ``best λ (selection)``: task arithmetic at the λ the selection split preferred (the user's
     best simple alternative), and ``best λ (oracle)``: the λ best on the shifted text itself;
   - ``uniform``: the uniform average;
   - ``soup top-k``: the mean genome of the k evolved recipes best on the selection split, decoded
     (a soup of recipes rather than one);
   - ``shrunk``: the release's genome moved toward the best-λ genome in proportion to the noise of
     its selection margin (α = max(0, 1 − (1.96·se/|margin|)²) of the way from λ to the release; the
     margin and se are the selection split's paired release − best λ);
   - ``oracle search``: the oracle run's release.

Generalisation efficiency = (best λ(selection) − release) ÷ (best λ(selection) − oracle search),
on the shifted text: 1 means the release found all the headroom the space has there, 0 none,
negative that it lost to the best λ.

The shifted blocks and the space are the same in every seed, so the headroom is a property of the
space, not of a seed: the table also reports the **pooled headroom**, the best any model scored in
any seed (an oracle search's release or a user's release), and efficiency against it. With
``--oracle none`` a seed runs the user's run only (half the time on a big zoo) and is measured
against the pooled headroom of the seeds that ran one. Recipes scored in an earlier seed (the λ
sweep, uniform) are not scored again. Runs of other seeds already in ``--out`` (same arguments
otherwise) are kept, so ``--first-seed`` resumes a benchmark without losing the seeds before it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import LAYERWISE, OUT, ROOT, local_ray, md_head, md_row, save_runs, signed, spread, write_text


def config(zoo: Path, blocks: int, seed: int, args, sets: dict | None = None) -> dict:
    cfg = {
        "name": f"shifted-b{blocks}-s{seed}{'-oracle' if sets else ''}",
        "zoo": str(zoo), "search_space": str(args.space),
        "eval": {"seq_len": 128, "max_blocks": blocks, "batch_size": args.batch_size,
                 "selection": {"blocks": args.selection_blocks}, "test_blocks": args.selection_blocks},
        "optimizer": {"name": "cmaes", "generations": args.generations, "population": args.population},
        "ray": {"evaluators": 2, "dashboard": False},
        "seed": seed, "dtype": args.dtype,
    }
    if args.reduce != "mean":  # e.g. the worst set's log-perplexity: one set may not be bought with another
        cfg["objectives"] = [{"name": f"{args.reduce}_logppl", "metric": "logppl", "reduce": args.reduce}]
    if sets:
        cfg["eval"]["sets"] = {k: str(v) for k, v in sets.items()}
    return cfg


def shifted_blocks(zoo: Path, n: int) -> dict:
    from transformers import AutoTokenizer

    from evo.data.text import read_texts
    from evo.data.tokens import token_blocks

    tok = AutoTokenizer.from_pretrained(zoo / "tokenizer")
    return {f.stem: token_blocks(read_texts(f), tok, 128, n) for f in sorted((zoo / "shifted").glob("*.jsonl"))}


def scorer(zoo: Path, dtype: str):
    """An in-process evaluator over the zoo's base and specialists (as the run's evaluators hold them)."""
    from evo.merge import load_model_dir, task_vectors
    from evo.scoring.evaluator import Evaluator

    from evo.core.tensors import to_numpy
    manifest = json.loads((zoo / "zoo.json").read_text())
    base, config = load_model_dir(zoo / manifest["paths"]["base"])
    specs = {m: load_model_dir(zoo / p)[0] for m, p in manifest["paths"]["specialists"].items()}
    deltas = task_vectors(base, specs)
    return Evaluator(to_numpy(base), {m: to_numpy(d) for m, d in deltas.items()}, config.to_dict(),
                     batch_size=8, dtype=dtype, threads=2)


def models_to_score(run_dir: Path, result) -> dict:
    """label -> Recipe: the release, the λ sweep, uniform, soups and the shrunk release."""
    from evo.artifacts.store import RunStore
    from evo.loop.experiment import load_config
    from evo.loop.generation import make_space
    from evo.loop.selection import baseline_recipes
    from evo.search.recipe import Recipe

    store = RunStore.open(run_dir)
    cfg = load_config(store.config(), source=str(run_dir / "config.yaml"))
    space = make_space(cfg)
    sel = result.selection
    out = {"release": Recipe.from_dict(sel["release_recipe"])}
    base = baseline_recipes(cfg, lambdas=list(cfg.eval.selection.lambdas))
    for label, r in base.items():
        if label.startswith("task arithmetic (lambda=") or label == "uniform average":
            out[label] = r
    by_id = {c["candidate"]: c for c in store.candidates() if c.get("genome") is not None}
    # every re-scored evolved recipe, by its selection mean (a raced-out one by the blocks it saw:
    # it was dropped as clearly worse, so it ranks low either way)
    evolved = []
    for label, row in (sel.get("candidates") or {}).items():
        full = (row.get("selection") or {}).get("mean")
        partial = ((row.get("dropped") or {}).get("partial") or {}).get("mean")
        if full is not None or partial is not None:  # survivors first, then the raced-out by what they saw
            evolved.append((full is None, full if full is not None else partial, label))
    evolved = [(m, label) for _, m, label in sorted(evolved)]
    genomes = []
    for _, label in evolved:
        cid = label.split("(")[-1].rstrip(")")
        if cid in by_id:
            genomes.append(np.asarray(by_id[cid]["genome"]))
    out["_soup_pool"] = (len(evolved), len(genomes))
    for k in (2, 4, 8):
        if len(genomes) >= k:
            out[f"soup top-{k}"] = space.decode(np.mean(genomes[:k], axis=0))
    best_lam = sel.get("best_lambda")
    margin = (sel.get("margins") or {}).get("release_vs_best_lambda/selection") or \
        (sel.get("margins") or {}).get("release_vs_best_baseline/selection")
    if best_lam and margin and sel.get("release_kind") == "evolved":
        lam = float(best_lam.split("=")[-1].rstrip(")"))
        g_lam = space.uniform_genome(weight=lam, density=1.0)
        g_rel = space.encode(out["release"])
        m, se = abs(margin["mean"]), margin["se"]
        alpha = max(0.0, 1.0 - (1.96 * se / m) ** 2) if m > 0 else 0.0
        out["shrunk"] = space.decode(g_lam + alpha * (g_rel - g_lam))
        out["_alpha"] = alpha
    return out


def run_seed(zoo: Path, seed: int, args, blocks_sets: dict, ev, cache: dict) -> dict:
    """One seed's runs and shifted scores; ``cache`` (recipe key -> block scores) spans seeds, so
    the seed-independent models (the λ sweep, uniform) are scored once."""
    import evo
    from evo.data.draws import paired_difference
    from evo.search.recipe import Recipe

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        user = evo.run(config(zoo, args.blocks, seed, args), Path(tmp) / "user", quiet=True)
        recipes = models_to_score(Path(tmp) / "user", user)
        if args.oracle == "search":
            oracle = evo.run(config(zoo, args.blocks, seed, args,
                                    sets={d: zoo / "shifted" / f"{d}.jsonl" for d in blocks_sets}),
                             Path(tmp) / "oracle", quiet=True)
            recipes["oracle search"] = Recipe.from_dict(
                oracle.selection["release_recipe"]) if oracle.selection else oracle.best_recipe
    alpha = recipes.pop("_alpha", None)
    pool = recipes.pop("_soup_pool", None)
    sel = user.selection
    scores = {}
    for label, r in recipes.items():
        if r.key() not in cache:
            cache[r.key()] = ev.block_scores(r.to_dict(), blocks_sets)
        scores[label] = cache[r.key()]
    names = list(blocks_sets)
    mean = {label: float(np.mean([s[n].mean() for n in names])) for label, s in scores.items()}
    lambdas = [k for k in mean if k.startswith("task arithmetic (lambda=")]
    best_sel = sel.get("best_lambda") or min(lambdas, key=lambda k: mean[k])
    oracle_lam = min(lambdas, key=mean.__getitem__)
    vs = {label: paired_difference(scores[label], scores[best_sel], names) for label in scores}
    head = mean[best_sel] - mean["oracle search"] if "oracle search" in mean else None
    return {
        "seed": seed, "blocks": args.blocks, "seconds": time.time() - t0, "oracle": args.oracle,
        "release": sel["release"], "release_kind": sel["release_kind"], "best_lambda_selection": best_sel,
        "best_lambda_oracle": oracle_lam, "alpha": alpha, "soup_pool": pool, "mean": mean,
        "per_set": {label: {n: float(s[n].mean()) for n in names} for label, s in scores.items()},
        "vs_best_lambda": vs,
        "efficiency": (mean[best_sel] - mean["release"]) / head if head is not None and head > 1e-9 else None,
        "headroom": head,
        "selection_margin": (sel.get("margins") or {}).get("release_vs_best_baseline/selection"),
    }


def table(runs: list[dict], args) -> str:
    labels = ["release", "soup top-2", "soup top-4", "soup top-8", "shrunk", "best λ (oracle)", "uniform average",
              "oracle search"]
    lines = [
        f"{args.label}; shifted text: {args.shifted_blocks} blocks × 128 tokens per domain of documents beyond the "
        f"zoo's (experiments/make_shifted.py); user's run: defaults, CMA-ES {args.generations} × {args.population}, "
        f"{args.blocks} search blocks/set, {args.dtype}; seeds {[r['seed'] for r in runs]}. Δ = model − task "
        "arithmetic at the λ chosen on selection, on the shifted text, paired per block and stratified by domain "
        "(negative: better than that λ); median [min…max] over seeds; 'clear' = 95% interval below zero.",
        "",
        md_head("model", "Δ vs best λ (selection)", "clear wins", "mean log-ppl (shifted)", align="llr"),
    ]
    for label in labels:
        key = {"best λ (oracle)": None}.get(label, label)
        if label == "best λ (oracle)":
            d = [r["mean"][r["best_lambda_oracle"]] - r["mean"][r["best_lambda_selection"]] for r in runs]
            m = [r["mean"][r["best_lambda_oracle"]] for r in runs]
            wins = sum(r["vs_best_lambda"][r["best_lambda_oracle"]]["hi"] < 0 for r in runs)
        else:
            have = [r for r in runs if key in r["vs_best_lambda"]]
            if not have:
                continue
            d = [r["vs_best_lambda"][key]["mean"] for r in have]
            m = [r["mean"][key] for r in have]
            wins = sum(r["vs_best_lambda"][key]["hi"] < 0 for r in have)
        lines.append(md_row(label, signed(d), f"{wins}/{len(d)}", spread(m)))
    eff = [r["efficiency"] for r in runs if r["efficiency"] is not None]
    heads = [r["headroom"] for r in runs if r["headroom"] is not None]
    if eff:
        lines += ["", f"Generalisation efficiency (release's gain over best λ(selection) ÷ the same seed's oracle "
                  f"search's, shifted): {signed(eff)}; headroom (best λ(selection) − oracle search): {signed(heads)} nats."]
    pooled = pooled_headroom(runs)
    if pooled:
        label, seed, head = pooled
        effs = [(r["mean"][r["best_lambda_selection"]] - r["mean"]["release"]) / head for r in runs]
        lines += ["", f"Pooled headroom (the shifted blocks are the same in every seed; the best any model scored "
                  f"there: {label} of seed {seed}): {head:.4f} nats below best λ(selection); the release's "
                  f"efficiency against it: {', '.join(f'{e:+.2f}' for e in effs)} (seeds {[r['seed'] for r in runs]})."]
    lines += ["", f"Released an evolved recipe in {sum(r['release_kind'] == 'evolved' for r in runs)}/{len(runs)} "
              f"seeds; {sum(r.get('oracle', 'search') == 'search' for r in runs)}/{len(runs)} seeds ran an oracle search."]
    return "\n".join(lines) + "\n"


def pooled_headroom(runs: list[dict]) -> tuple[str, int, float] | None:
    """(model, seed, nats): the largest gain over best λ(selection) any model reached on the shifted text
    in any seed; the same best λ in every seed is required (else seeds' gains are not comparable)."""
    lams = {r["best_lambda_selection"] for r in runs}
    if len(lams) != 1:
        return None
    best = max(((r["mean"][r["best_lambda_selection"]] - m, label, r["seed"]) for r in runs
                for label, m in r["mean"].items()), default=None)
    return (best[1], best[2], best[0]) if best and best[0] > 0 else None


def earlier_runs(out: Path, args, seeds: range) -> list[dict]:
    """Runs of other seeds already saved in ``out`` by the same benchmark (arguments equal but for the
    seeds and the oracle), kept so that ``--first-seed`` resumes without losing them."""
    if not out.is_file():
        return []
    saved = json.loads(out.read_text())
    loose = {"seeds", "first_seed", "oracle", "out", "from_json"}
    mine = {k: v for k, v in vars(args).items() if k not in loose}
    theirs = {k: v for k, v in saved.get("args", {}).items() if k not in loose}
    if {k: theirs.get(k) for k in mine} != mine:
        print(f"bench_shifted: {out} holds runs with other arguments; writing over them", file=sys.stderr)
        return []
    return [r for r in saved.get("runs", []) if r["seed"] not in seeds]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"))
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--selection-blocks", type=int, default=64)
    p.add_argument("--shifted-blocks", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--space", default=str(LAYERWISE),
                   help="the search space of both runs (e.g. search_spaces/task_arithmetic_models.yaml: fewer genes)")
    p.add_argument("--reduce", default="mean", choices=["mean", "max"],
                   help="the objective over the evaluation sets of both runs (max: the worst set)")
    p.add_argument("--oracle", default="search", choices=["search", "none"],
                   help="none: skip the oracle search (efficiency then uses the pooled headroom of the seeds that ran one)")
    p.add_argument("--label", default="Tiny zoo (en, de, code)")
    p.add_argument("--from-json", default=None)
    p.add_argument("--out", default=str(OUT / "bench_shifted.json"))
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for k, v in saved["args"].items():
            setattr(args, k, v)
        print(table(saved["runs"], args))
        return 0
    zoo = Path(args.zoo).resolve()
    if not (zoo / "shifted" / "shifted.json").is_file():
        print(f"bench_shifted: no shifted split in {zoo} (python experiments/make_shifted.py --zoo {zoo})", file=sys.stderr)
        return 2
    blocks_sets = shifted_blocks(zoo, args.shifted_blocks)
    ev = scorer(zoo, args.dtype)
    out = Path(args.out)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = earlier_runs(out, args, seeds)
    cache: dict = {}
    with local_ray():
        for seed in seeds:
            r = run_seed(zoo, seed, args, blocks_sets, ev, cache)
            runs = sorted(runs + [r], key=lambda x: x["seed"])
            v = r["vs_best_lambda"]
            print(f"seed {seed}: release {r['release'][:34]:34s} Δ {v['release']['mean']:+.4f} "
                  f"[{v['release']['lo']:+.4f}, {v['release']['hi']:+.4f}]  "
                  f"oracle {v.get('oracle search', {}).get('mean', float('nan')):+.4f}  "
                  f"soup-4 {v.get('soup top-4', {}).get('mean', float('nan')):+.4f}  shrunk "
                  f"{v.get('shrunk', {}).get('mean', float('nan')):+.4f} (α {r['alpha']})  {r['seconds']:.0f}s", flush=True)
            save_runs(out, args, runs)
    text = table(runs, args)
    print()
    print(text)
    write_text(out.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
