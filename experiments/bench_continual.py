"""Continual benchmark: evo's never-ending loop against plain sequential LoRA fine-tuning.

Shards of text arrive in order, each from another domain (a domain shift at every step). Both
methods get the same LoRA training steps per shard on the same training split:

* **sequential**: LoRA (fixed rank, learning rate) on the newest shard, merged into the
  weights, then the next shard on top: the usual way to keep a model up to date;
* **evo**: the continual loop (``evo.continual``): merges of the zoo's specialists and the
  current release, each with a LoRA gene set fitted on the newest shard, searched by NSGA-II
  on adaptation (newest held-out) and retention (replay of older data); a release only when
  the rule holds (retention within ``--tolerance`` nats of the current release).

After each version, both are measured on the full held-out split of every shard so far (the
same split evo uses): the newest shard, the mean over earlier shards, and the first shard.

    python experiments/bench_continual.py      # ~25 min on 2 cores; builds the tiny zoo if missing
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from _common import ROOT, md_head, md_row, write_json, write_text


def shard_texts(zoo, domain: str, n: int, doc_chars: int) -> list[str]:
    """Documents a model of the zoo never trained on: the zoo's test split for its own
    domains, otherwise the domain's text from the start."""
    from evo.data.corpus import load_domain
    from evo.data.text import read_texts

    if domain in zoo.domains:
        return read_texts(zoo.data_dir(domain, "test"))[:n]
    return load_domain(domain, max_chars=n * doc_chars * 2, doc_chars=doc_chars)[:n]


def versions_of(folder: Path, tokenizer, settings: dict) -> list[dict]:
    """Train and held-out blocks per version, exactly as the loop's stream splits them."""
    from evo.data.stream import DataStream

    stream = DataStream(folder, tokenizer, **settings)
    out = []
    while True:
        reports = stream.poll(max_versions=1)
        made = [r for r in reports if r.version]
        if not made:
            return out
        w = stream.window()
        out.append({"version": w.version, "shard": made[-1].shard, "train": w.train, "heldout": w.heldout})


def logppl(model, blocks, batch_size=16) -> float:
    import torch

    from evo.scoring.fitness import mean_nll

    return mean_nll(model, torch.from_numpy(blocks), batch_size=batch_size)


def measure(model, versions, k) -> dict:
    """Log-perplexity on shard k (newest), the mean over shards < k, and shard 0."""
    newest = logppl(model, versions[k]["heldout"])
    earlier = [logppl(model, versions[j]["heldout"]) for j in range(k)]
    return {"newest": newest, "earlier": sum(earlier) / len(earlier) if earlier else math.nan,
            "first": earlier[0] if earlier else newest, "shards": [*earlier, newest]}


def zoo_train_blocks(zoo, tokenizer, args):
    """The zoo's own training text, the oldest rehearsal stratum (as the loop's prior)."""
    import numpy as np

    from evo.data.text import read_texts
    from evo.data.tokens import token_blocks

    return np.concatenate([token_blocks(read_texts(zoo.data_dir(d, "train")), tokenizer, args.seq_len,
                                        args.replay_train_blocks).numpy() for d in zoo.domains])


def rehearsal_pool(prior, versions, k, args):
    """Older training blocks for version ``k``, as the loop builds its pool: the same number
    (``--replay-train-blocks``) from each older version's training split and the zoo's."""
    import numpy as np

    rng = np.random.default_rng([args.seed, k])
    n = args.replay_train_blocks
    return np.concatenate([b[rng.choice(len(b), n, replace=len(b) < n)]
                           for b in [prior, *(versions[j]["train"] for j in range(k))]])


def sequential(zoo, versions, args, tokenizer=None, share: float = 0.0) -> list[dict]:
    """LoRA on each new shard in turn, merged into the weights; with ``share`` > 0 each batch
    rehearses that share of older training blocks (the loop's pool) at a fixed rate."""
    from transformers import AutoModelForCausalLM

    from evo.scoring.lora import LoraGenes, TrainingData, fit_lora, merged_state_dict, unload

    model = AutoModelForCausalLM.from_pretrained(zoo.base_dir).eval()
    genes = LoraGenes(rank=args.rank, alpha=2.0 * args.rank, target_modules="all", lr=args.lr, steps=args.steps,
                      rehearsal=share)
    prior = zoo_train_blocks(zoo, tokenizer, args) if share else None
    rows = []
    for k, v in enumerate(versions):
        t0 = time.time()
        data = TrainingData(v["train"], rehearsal_pool(prior, versions, k, args) if share else None)
        peft_model, stats = fit_lora(model, data, genes, seed=args.seed + k)
        weights = merged_state_dict(peft_model)
        model = unload(peft_model)
        model.load_state_dict(weights, strict=False)
        model.eval()
        rows.append({**measure(model, versions, k), "seconds": time.time() - t0})
        print(f"  sequential{f' + rehearsal {share:g}' if share else ''} after {v['shard']}: newest {rows[-1]['newest']:.4f}  earlier {rows[-1]['earlier']:.4f}", flush=True)
    return rows


def evolve(zoo, folder, versions, args) -> tuple[list[dict], dict]:
    import yaml
    from transformers import AutoModelForCausalLM

    import evo
    from evo.artifacts.store import RunStore

    space = yaml.safe_load((ROOT / "search_spaces" / "merge_lora.yaml").read_text())
    space["genes"]["lora.steps"] = {"type": "int", "low": args.steps, "high": args.steps, "scope": "global"}
    space_path = Path(args.out) / "space.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    config = {
        "name": "bench_continual", "zoo": str(zoo.root), "search_space": str(space_path), "seed": args.seed,
        "eval": {"seq_len": args.seq_len, "max_blocks": args.eval_blocks, "batch_size": 16, "train_blocks": 100_000},
        "optimizer": {"name": "nsga2", "population": args.population},
        "stream": {"folder": str(folder), "generations": args.generations, "replay_blocks": args.replay_blocks,
                   "heldout_frac": args.heldout_frac, "replay_train_blocks": args.replay_train_blocks},
        "release": {"tolerance": args.tolerance, "first": args.first},
        "ray": {"evaluators": 2, "cpus_per_evaluator": 1, "threads_per_evaluator": 1, "dashboard": False,
                "object_store_mb": 512},
    }
    run_dir = Path(args.out) / "run"
    t0 = time.time()
    result = evo.run(config, run_dir, quiet=not args.verbose)
    seconds = time.time() - t0
    rows = []
    base = AutoModelForCausalLM.from_pretrained(zoo.base_dir).eval()
    for k, h in enumerate(result.versions):
        assert h["version"] == versions[k]["version"], "the loop and the benchmark split the stream differently"
        model = AutoModelForCausalLM.from_pretrained(run_dir / "releases" / h["release"]).eval() if h["release"] else base
        rows.append({**measure(model, versions, k), "release": h["release"], "released": h["released"],
                     "decision": h["decision"]})
        print(f"  evo after {h['shard']}: {h['decision']}; newest {rows[-1]['newest']:.4f}  earlier {rows[-1]['earlier']:.4f}",
              flush=True)
    return rows, {"seconds": seconds, "candidates": len(RunStore.open(run_dir).candidates())}


def ppl(x) -> str:
    """A mean log-perplexity as a perplexity cell ("-" where there is none)."""
    return "-" if x is None or math.isnan(x) else f"{math.exp(x):.1f}"


def table(versions, base_rows, seq, ev) -> str:
    lines = [md_head("version", "shard", "base newest", "sequential newest", "evo newest", "evo share of gain",
                     "sequential earlier", "evo earlier", "sequential first", "evo first", "evo release")]
    for k, v in enumerate(versions):
        gain = base_rows[k]["newest"] - seq[k]["newest"]
        share = (base_rows[k]["newest"] - ev[k]["newest"]) / gain if gain > 1e-9 else math.nan
        lines.append(md_row(k, v["shard"], ppl(base_rows[k]["newest"]), ppl(seq[k]["newest"]), ppl(ev[k]["newest"]),
                            "-" if math.isnan(share) else f"{share:.0%}", ppl(seq[k]["earlier"]), ppl(ev[k]["earlier"]),
                            ppl(seq[k]["first"]), ppl(ev[k]["first"]), ev[k]["release"] or "-"))
    return "\n".join(lines)


def rehearsal_table(versions, base_rows, seq, rep, ev, share: float) -> str:
    """evo against sequential LoRA that rehearses at a fixed share: what the search adds."""
    lines = [md_head("version", "shard", f"sequential+rehearsal {share:g} newest", "its share of gain",
                     "evo share of gain", "sequential+rehearsal earlier", "evo earlier", "sequential+rehearsal first",
                     "evo first")]
    for k, v in enumerate(versions):
        gain = base_rows[k]["newest"] - seq[k]["newest"]
        shares = [(base_rows[k]["newest"] - r[k]["newest"]) / gain if gain > 1e-9 else math.nan for r in (rep, ev)]
        lines.append(md_row(k, v["shard"], ppl(rep[k]["newest"]), *("-" if math.isnan(x) else f"{x:.0%}" for x in shares),
                            ppl(rep[k]["earlier"]), ppl(ev[k]["earlier"]), ppl(rep[k]["first"]), ppl(ev[k]["first"])))
    return "\n".join(lines)


def retention_table(versions, methods: dict[str, list[dict]]) -> str:
    """Each older shard: perplexity when it was the newest, the worst at any later version and
    at the last one, relative to the first (what "forgetting" means per shard)."""
    def cell(rows, j):
        then = rows[j]["shards"][j]
        later = [r["shards"][j] for r in rows[j + 1:]]
        worst, last = max(later), later[-1]
        return (f"{math.exp(then):.1f} / {math.exp(worst):.1f} ({math.exp(worst - then) - 1:+.0%}) / "
                f"{math.exp(last):.1f} ({math.exp(last - then) - 1:+.0%})")

    lines = [md_head("shard", *(f"{m}: when newest / worst later / last" for m in methods))]
    for j, v in enumerate(versions[:-1]):
        lines.append(md_row(v["shard"], *(cell(rows, j) for rows in methods.values())))
    return "\n".join(lines)


def plot(versions, base_rows, seq, ev, path: Path, rep=None, share: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(versions)))
    labels = [f"{k}\n{v['shard'].split('.')[0]}" for k, v in enumerate(versions)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("newest", "earlier", "first"),
                              ("newest shard (adaptation)", "mean over earlier shards (retention)", "first shard")):
        if key == "newest":
            ax.plot(x, [math.exp(r[key]) for r in base_rows], "k:", marker="o", label="base")
        ax.plot(x, [math.exp(r[key]) for r in seq], "C1-", marker="s", label="sequential LoRA")
        if rep:
            ax.plot(x, [math.exp(r[key]) for r in rep], "C2--", marker="d", label=f"sequential + rehearsal {share:g}")
        ax.plot(x, [math.exp(r[key]) for r in ev], "C0-", marker="^", label="evo releases")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.set_xticks(x, labels)
        ax.set_ylabel("perplexity (held-out)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Continual adaptation: lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo"), help="tiny zoo directory (built if missing)")
    p.add_argument("--shards", default="doc,fr,c,de", help="one shard per domain, in arrival order")
    p.add_argument("--docs", type=int, default=150, help="documents per shard")
    p.add_argument("--doc-chars", type=int, default=2000)
    p.add_argument("--steps", type=int, default=60, help="LoRA steps per shard (both methods)")
    p.add_argument("--lr", type=float, default=2e-3, help="sequential LoRA learning rate (evo searches its own)")
    p.add_argument("--rank", type=int, default=8, help="sequential LoRA rank (evo searches its own)")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=3, help="generations per data version")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="retention tolerance of the release rule (nats, per older shard and the prior)")
    p.add_argument("--first", default="weighted", choices=["weighted", "guarded"],
                   help="release.first (the README's figures were measured with the weighted first release)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out and replay blocks per candidate")
    p.add_argument("--heldout-frac", type=float, default=0.15)
    p.add_argument("--replay-blocks", type=int, default=64, help="replay blocks per candidate (retention)")
    p.add_argument("--replay-train-blocks", type=int, default=256,
                   help="rehearsal pool: training blocks per older version and from the zoo")
    p.add_argument("--rehearsal-share", type=float, default=0.5,
                   help="the second baseline: sequential LoRA rehearsing this share of each batch (0: skip it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_continual"))
    p.add_argument("--verbose", action="store_true", help="show the loop's own progress")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the evaluators use the cores; one thread each keeps them fed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo.zoo.build import build_zoo

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    folder = out / "stream"
    folder.mkdir(parents=True)
    zoo = build_zoo(args.zoo, domains=("en", "de", "code"), size="tiny", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(zoo.base_dir)
    for k, domain in enumerate(args.shards.split(",")):
        texts = shard_texts(zoo, domain, args.docs, args.doc_chars)
        tmp = folder / f".{k:03d}-{domain}.jsonl.part"
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        tmp.rename(folder / f"{k:03d}-{domain}.jsonl")
    settings = {"seq_len": args.seq_len, "heldout_frac": args.heldout_frac, "replay_blocks": args.eval_blocks,
                "seed": args.seed}
    versions = versions_of(folder, tokenizer, settings)
    print("shards: " + ", ".join(f"{v['shard']} ({len(v['train'])} train / {len(v['heldout'])} held-out blocks)"
                                  for v in versions), flush=True)
    base = AutoModelForCausalLM.from_pretrained(zoo.base_dir).eval()
    base_rows = [measure(base, versions, k) for k in range(len(versions))]
    t0 = time.time()
    seq = sequential(zoo, versions, args)
    seq_s = time.time() - t0
    rep = sequential(zoo, versions, args, tokenizer, args.rehearsal_share) if args.rehearsal_share > 0 else None
    ev, info = evolve(zoo, folder, versions, args)
    print()
    text = table(versions, base_rows, seq, ev)
    if rep:
        text += "\n\n" + rehearsal_table(versions, base_rows, seq, rep, ev, args.rehearsal_share)
    methods = {"evo": ev, "sequential": seq, **({f"sequential+rehearsal {args.rehearsal_share:g}": rep} if rep else {})}
    text += "\n\n" + retention_table(versions, methods)
    print(text)
    print(f"\nsequential LoRA: {seq_s:.0f}s; evo loop: {info['seconds']:.0f}s "
          f"({args.population} per generation, {args.generations} generations per version)")
    plot(versions, base_rows, seq, ev, out / "bench_continual.png", rep, args.rehearsal_share)
    write_json(out / "results.json", {"args": vars(args), "base": base_rows, "sequential": seq, "evo": ev,
                                      "sequential_rehearsal": rep,
                                      "seconds": {"sequential": seq_s, "evo": info["seconds"]}}, indent=2)
    write_text(out / "table.md", text + "\n")
    print(f"plot: {out / 'bench_continual.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
