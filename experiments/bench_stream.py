"""The never-ending loop on a real model: a stream of shards with a domain shift at each, learned by
`evo run --follow` on the SmolLM2-135M zoo, against the usual ways of keeping a model up to date.

Shards of real text (default: Italian Bible, C headers, Spanish Bible, French Bible: three domains
the zoo's specialists never saw and one they did, the French specialist's own *test* split) are
dropped one at a time into a followed folder by ``experiments/stream_producer.py`` while
``evo run --follow`` runs in its own process, as a user's pipeline would; each shard's held-out
split is the loop's own (content hash, ``stream.split_seed``). Every method gets the same data and
the same step budget per version (``--steps`` x ``--batch-size`` blocks of ``--seq-len`` tokens):

* **sequential LoRA**: LoRA on the newest shard, folded into the weights, the next shard on top;
* **sequential LoRA + rehearsal**: the same, with ``--rehearsal`` of each batch drawn from the
  older training text (the pool the loop rehearses from: each older shard's and the zoo's);
* **sequential full fine-tuning**: every weight, AdamW at ``--ft-lr``, newest shard only;
* **retrain on everything so far**: LoRA from the base on the union of the shards so far (an upper
  bound on retention that pays for it in adaptation);
* **evo**: the loop with ``stream.adapters`` (one LoRA fit per version from the current release,
  with the same settings as sequential LoRA + rehearsal), then ``--generations`` x
  ``--population`` merges of {specialists, current release, adapted model}, released by the rule
  (retention within ``--tolerance`` nats of each older stratum's anchor, the general-domain text
  guarded as its own stratum), for each of ``--seeds`` (the search seed; the splits stay fixed).

After each version every model is measured on the held-out split of every shard so far (at most
``--measure-blocks`` blocks each, the same blocks for every method) and on held-out general-domain
text the base model is good at (``--general``: English technical prose; documents the loop's guard
never sees: it guards with their ``valid`` split, the table uses ``test``). Wall time and the
machine's CPU-seconds per version are measured for every method (evo: from the shard's drop to
the end of its release step, all of Ray's processes included).

    python experiments/bench_stream.py --zoo zoo-smollm2 --out experiments/out/stream-smollm2   # everything
    python experiments/bench_stream.py --zoo zoo-smollm2 --out ... --only baselines              # one part
    python experiments/bench_stream.py --zoo zoo-smollm2 --out ... --only evo --seeds 1,2
    python experiments/bench_stream.py --zoo zoo-smollm2 --out ... --only table                  # table + plot
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import OUT, ROOT, md_head, md_row, write_text

import numpy as np

from stream_producer import cpu_seconds, produce

METHODS = {"sequential": "sequential LoRA", "rehearsal": "sequential LoRA + rehearsal",
           "full": "sequential full fine-tuning", "union": "retrain on everything so far (LoRA from base)"}


# ---------------------------------------------------------------------------------------- data
def prepare(args) -> dict:
    """Shard files, the loop's split of each (train / held-out blocks), general-domain text."""
    from transformers import AutoTokenizer

    from evo.data.corpus import load_domain, split_documents
    from evo.data.stream import DataStream
    from evo.data.text import read_texts
    from evo.zoo.build import Zoo, write_jsonl
    from evo.data.tokens import token_blocks

    out = Path(args.out)
    zoo = Zoo.load(args.zoo)
    tokenizer = AutoTokenizer.from_pretrained(zoo.root / "tokenizer")
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for k, domain in enumerate(args.shards.split(",")):
        path = shards / f"{k:03d}-{domain}.jsonl"
        if path.exists():
            continue
        if domain in zoo.domains:  # documents the specialist never trained on: its test split
            texts = read_texts(zoo.data_dir(domain, "test"))[: args.docs]
        else:
            texts = load_domain(domain, max_chars=args.docs * args.doc_chars * 2, doc_chars=args.doc_chars)[: args.docs]
        write_jsonl(path.with_name(path.name + ".part"), texts)
        path.with_name(path.name + ".part").rename(path)
    general = split_documents(load_domain(args.general, max_chars=600_000, doc_chars=args.doc_chars), seed=0)
    write_jsonl(out / "general-valid.jsonl", general["valid"])
    write_jsonl(out / "general-test.jsonl", general["test"])
    # the loop's own split: the same DataStream settings, one version per shard, in order
    stream = DataStream(shards, tokenizer, seq_len=args.seq_len, heldout_frac=args.heldout_frac, replay_blocks=8,
                        seed=args.split_seed, min_chars=32, near_dup_threshold=0.8)
    versions = []
    while True:
        made = [r for r in stream.poll(max_versions=1) if r.version]
        if not made:
            break
        w = stream.window()
        versions.append({"version": w.version, "shard": made[-1].shard, "train": w.train,
                         "heldout": w.heldout[: args.measure_blocks]})
    general_test = token_blocks(general["test"], tokenizer, args.seq_len, args.measure_blocks).numpy()
    # the zoo's training text, one rehearsal stratum as the loop builds it (evo.scoring.sources.train_blocks)
    prior = np.concatenate([token_blocks(read_texts(zoo.data_dir(d, "train")), tokenizer, args.seq_len).numpy()
                            for d in zoo.domains])
    return {"zoo": zoo, "versions": versions, "general": general_test, "prior_train": prior}


def measure(model, data, k: int, batch_size: int = 16) -> dict:
    """Per-block NLL on every shard's held-out blocks up to version ``k`` and on general text."""
    import torch

    from evo.scoring.fitness import block_nlls

    model.eval()
    sets = {v["shard"]: v["heldout"] for v in data["versions"][: k + 1]}
    sets["general"] = data["general"]
    return {name: block_nlls(model, torch.from_numpy(b), batch_size).tolist() for name, b in sets.items()}


def rehearsal_pool(data, k, args) -> np.ndarray | None:
    """Older training blocks for version ``k``, as the loop builds its pool: ``--replay-train-blocks``
    from each older version's training split and as many from the zoo's training text."""
    rng = np.random.default_rng([args.split_seed, k])
    n = args.replay_train_blocks
    strata = [data["prior_train"], *(data["versions"][j]["train"] for j in range(k))]
    return np.concatenate([b[rng.choice(len(b), n, replace=len(b) < n)] for b in strata])


# ----------------------------------------------------------------------------------- baselines
def lora_genes(args, share: float):
    from evo.scoring.lora import LoraGenes

    return LoraGenes(rank=args.rank, alpha=2.0 * args.rank, target_modules="all", lr=args.lr, steps=args.steps,
                     batch_size=args.batch_size, rehearsal=share)


def fit_lora_into(model, blocks, genes, seed):
    from evo.scoring.lora import fit_lora, merged_state_dict, unload

    peft_model, _ = fit_lora(model, blocks, genes, seed=seed)
    weights = merged_state_dict(peft_model)
    model = unload(peft_model)
    model.load_state_dict(weights, strict=False)
    return model.eval()


def full_finetune(model, blocks: np.ndarray, args, seed: int):
    """Plain full fine-tuning: AdamW on every weight, the same batches as LoRA would draw."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(blocks).long()
    opt = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    for _ in range(args.steps):
        batch = data[torch.randint(len(data), (args.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    del opt
    return model.eval()


def run_baseline(method: str, data, args, seed0: int = 0) -> list[dict]:
    """``method`` over the versions; ``seed0`` seeds the fits (adapter initialisation, batch order)."""
    import torch
    from transformers import AutoModelForCausalLM

    from evo.scoring.lora import TrainingData

    torch.set_num_threads(args.threads)
    zoo, versions = data["zoo"], data["versions"]
    model = AutoModelForCausalLM.from_pretrained(zoo.base_dir, dtype=torch.float32)
    rows = []
    for k, v in enumerate(versions):
        t0, c0 = time.time(), cpu_seconds()
        seed = seed0 + 1000 * k
        if method == "sequential":
            model = fit_lora_into(model, v["train"], lora_genes(args, 0.0), seed)
        elif method == "rehearsal":
            model = fit_lora_into(model, TrainingData(v["train"], rehearsal_pool(data, k, args)),
                                  lora_genes(args, args.rehearsal), seed)
        elif method == "full":
            model = full_finetune(model, v["train"], args, seed)
        elif method == "union":  # from the base every time, on every shard so far
            model = AutoModelForCausalLM.from_pretrained(zoo.base_dir, dtype=torch.float32)
            union = np.concatenate([versions[j]["train"] for j in range(k + 1)])
            model = fit_lora_into(model, union, lora_genes(args, 0.0), seed)
        seconds, cpu = time.time() - t0, cpu_seconds() - c0
        rows.append({"version": v["version"], "shard": v["shard"], "seconds": seconds, "cpu_seconds": cpu,
                     "nll": measure(model, data, k)})
        print(f"  {METHODS[method]} after {v['shard']}: {seconds:.0f}s, {cpu:.0f} CPU-s; newest "
              f"{np.mean(rows[-1]['nll'][v['shard']]):.4f}, general {np.mean(rows[-1]['nll']['general']):.4f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ evo
def evo_config(data, args, seed: int, folder: Path) -> dict:
    zoo = data["zoo"]
    sets = {d: str(zoo.data_dir(d, "valid")) for d in zoo.domains}
    sets["general"] = str(Path(args.out) / "general-valid.jsonl")  # guarded as its own stratum
    return {
        "name": f"bench_stream-seed{seed}", "zoo": str(zoo.root), "seed": seed,
        "search_space": str(ROOT / "search_spaces" / "stream_adapters.yaml"),
        "eval": {"seq_len": args.seq_len, "max_blocks": args.eval_blocks, "batch_size": 16, "train_blocks": 100_000,
                 "sets": sets, "train_sets": {d: str(zoo.data_dir(d, "train")) for d in zoo.domains}},
        "optimizer": {"name": "nsga2", "population": args.population},
        "stream": {"folder": str(folder), "generations": args.generations, "replay_blocks": args.replay_blocks,
                   "heldout_frac": args.heldout_frac, "split_seed": args.split_seed, "poll_s": 0.5,
                   "replay_train_blocks": args.replay_train_blocks, "prior": "per_set",
                   "adapters": {"lora": {"rank": args.rank, "alpha": 2.0 * args.rank, "target_modules": "all",
                                         "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
                                         "rehearsal": args.rehearsal}}},
        "release": {"tolerance": args.tolerance},
        "dtype": "float32",
        "ray": {"evaluators": args.evaluators, "cpus_per_evaluator": 1, "threads_per_evaluator": 1,
                "dashboard": False, "object_store_mb": args.object_store_mb},
    }


def run_evo(data, args, seed: int) -> dict:
    """``evo run --follow`` in its own process; the producer drops each shard once the run has
    finished the one before; SIGTERM once the last version is done."""
    import signal

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    base = Path(args.out) / f"evo-seed{seed}"
    if base.exists():
        import shutil

        shutil.rmtree(base)
    folder, run_dir = base / "followed", base / "run"
    folder.mkdir(parents=True)
    (base / "config.yaml").write_text(yaml.safe_dump(evo_config(data, args, seed, folder), sort_keys=False))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(base / "driver.log", "w")
    child = subprocess.Popen([sys.executable, "-m", "evo.cli", "run", str(base / "config.yaml"), "--run-dir",
                              str(run_dir), "--follow"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    shards = sorted((Path(args.out) / "shards").glob("*.jsonl"))
    try:
        drops = produce(shards, folder, run_dir=run_dir, log=base / "drops.jsonl", alive=lambda: child.poll() is None)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        child.wait()
        log.close()
    ckpt = json.loads((run_dir / "checkpoint.json").read_text())
    history = ckpt["stream"]["history"]
    torch.set_num_threads(args.threads)
    rows = []
    for k, (h, d) in enumerate(zip(history, drops)):
        v = data["versions"][k]
        assert h["version"] == v["version"], "the loop and the benchmark split the stream differently"
        path = run_dir / "releases" / h["release"] if h["release"] else data["zoo"].base_dir
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        rows.append({"version": h["version"], "shard": h["shard"], "release": h["release"], "released": h["released"],
                     "decision": h["decision"], "gain": h.get("gain"), "drift": h.get("drift"),
                     "steps_seconds": h.get("seconds"), "seconds": d["seconds"], "cpu_seconds": d["cpu_seconds"],
                     "nll": measure(model, data, k)})
        print(f"  evo seed {seed} after {h['shard']}: {h['decision']}; {d['seconds']:.0f}s, {d['cpu_seconds']:.0f} CPU-s "
              f"({', '.join(f'{a} {b:.0f}s' for a, b in (h.get('seconds') or {}).items())}); newest "
              f"{np.mean(rows[-1]['nll'][v['shard']]):.4f}, general {np.mean(rows[-1]['nll']['general']):.4f}", flush=True)
    candidates = sum(1 for _ in open(run_dir / "candidates.jsonl"))
    return {"seed": seed, "rows": rows, "candidates": candidates}


# ---------------------------------------------------------------------------------------- table
def mean(x) -> float:
    return float(np.mean(x))


def paired(a, b) -> tuple[float, float]:
    """Mean of a - b over the same blocks and its 95% half-width (normal)."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(1.96 * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def summarise(results: dict, args) -> str:
    base, versions = results["base"], results["versions"]
    methods = {m: results[m] for m in METHODS if m in results}
    evo_runs = results.get("evo", [])
    shards = [v["shard"] for v in versions]
    ppl = lambda x: f"{math.exp(x):.2f}"  # noqa: E731
    lines = []

    # 1. newest shard, per version
    head = ["version", "shard", "base"] + [METHODS[m] for m in methods] + [f"evo seed {r['seed']}" for r in evo_runs]
    lines += ["**Newest shard** (held-out perplexity after each version; lower is better):", "",
              md_head(*head)]
    for k, s in enumerate(shards):
        cells = [str(k), s, ppl(mean(base[s]))] + [ppl(mean(rows[k]["nll"][s])) for rows in methods.values()]
        cells += [ppl(mean(r["rows"][k]["nll"][s])) for r in evo_runs]
        lines.append(md_row(*cells))

    # 1b. the rehearsal baseline over its seeds, where run (--baseline-seeds)
    reh_runs = [methods["rehearsal"], *results.get("rehearsal_seeds", {}).values()] if "rehearsal" in methods else []
    if len(reh_runs) > 1:
        lines += ["", f"**Sequential LoRA + rehearsal over {len(reh_runs)} seeds of its fits** against evo over its "
                  f"{len(evo_runs)} search seeds (newest-shard held-out log-perplexity, median [min, max]):", "",
                  md_head("version", "shard", "+ rehearsal", "evo", "evo − (+ rehearsal), medians", align="llrrr")]
        for k, s in enumerate(shards):
            r = [mean(x[k]["nll"][s]) for x in reh_runs]
            e = [mean(x["rows"][k]["nll"][s]) for x in evo_runs] or [float("nan")]
            lines.append(md_row(k, s, f"{np.median(r):.4f} [{min(r):.4f}, {max(r):.4f}]",
                                f"{np.median(e):.4f} [{min(e):.4f}, {max(e):.4f}]", f"{np.median(e) - np.median(r):+.4f}"))

    # 2. share of the gain of sequential LoRA (+ rehearsal), per version; median over seeds
    lines += ["", "**Share of the newest-shard gain** (improvement over the base, in nats, as a share of the "
              "baseline's; evo's median over seeds, [min, max]):", "",
              md_head("version", "shard", "sequential gain", "+ rehearsal gain", "evo share of sequential's",
                      "evo share of + rehearsal's",
                      f"evo − (+ rehearsal), paired 95% (seed {evo_runs[0]['seed'] if evo_runs else '-'})", align="llrrrrr")]
    for k, s in enumerate(shards):
        b = mean(base[s])
        g_seq = b - mean(methods["sequential"][k]["nll"][s]) if "sequential" in methods else float("nan")
        g_reh = b - mean(methods["rehearsal"][k]["nll"][s]) if "rehearsal" in methods else float("nan")
        ev = [b - mean(r["rows"][k]["nll"][s]) for r in evo_runs]

        def share(g, ev=ev):
            if not ev or not g > 0:
                return "-"
            xs = [e / g for e in ev]
            return f"{np.median(xs):.0%} [{min(xs):.0%}, {max(xs):.0%}]"

        d = paired(evo_runs[0]["rows"][k]["nll"][s], methods["rehearsal"][k]["nll"][s]) if evo_runs and "rehearsal" in methods else (float("nan"),) * 2
        lines.append(md_row(k, s, f"{g_seq:.4f}", f"{g_reh:.4f}", share(g_seq), share(g_reh), f"{d[0]:+.4f} ± {d[1]:.4f}"))

    # 3. older shards: now vs when newest (drift in nats), worst over later versions, per method
    lines += ["", "**Forgetting**: each older shard's held-out log-perplexity at later versions minus when it was "
              "the newest (nats; worst over later versions / at the last; evo: worst over seeds):", "",
              md_head("shard", *[METHODS[m] for m in methods], "evo")]
    for j, s in enumerate(shards[:-1]):
        def drift(rows, j=j, s=s):
            then = mean(rows[j]["nll"][s])
            later = [mean(r["nll"][s]) - then for r in rows[j + 1:]]
            return max(later), later[-1]
        cells = [f"{w:+.3f} / {last:+.3f}" for w, last in (drift(rows) for rows in methods.values())]
        if evo_runs:
            ds = [drift(r["rows"]) for r in evo_runs]
            cells.append(f"{max(d[0] for d in ds):+.3f} / {max(d[1] for d in ds):+.3f}")
        lines.append(md_row(s, *cells))

    # 4. general-domain text
    lines += ["", f"**General-domain text** ({args.general}, test documents; log-perplexity minus the base's "
              f"{mean(base['general']):.4f}, worst over versions; evo: worst over seeds):", "",
              md_head(*[METHODS[m] for m in methods], "evo")]
    g0 = mean(base["general"])
    cells = [f"{max(mean(r['nll']['general']) for r in rows) - g0:+.3f}" for rows in methods.values()]
    if evo_runs:
        cells.append(f"{max(mean(x['nll']['general']) for r in evo_runs for x in r['rows']) - g0:+.3f}")
    lines.append(md_row(*cells))

    # 5. time per version
    lines += ["", "**Time per version** (wall seconds / machine CPU-seconds; evo: from the shard's drop to the end "
              "of its release step, Ray and the evaluators included):", "",
              md_head("version", *[METHODS[m] for m in methods], *[f"evo seed {r['seed']}" for r in evo_runs],
                      "evo ÷ (+ rehearsal), wall")]
    for k in range(len(shards)):
        cells = [f"{rows[k]['seconds']:.0f} / {rows[k]['cpu_seconds']:.0f}" for rows in methods.values()]
        cells += [f"{r['rows'][k]['seconds']:.0f} / {r['rows'][k]['cpu_seconds']:.0f}" for r in evo_runs]
        ratio = [r["rows"][k]["seconds"] / methods["rehearsal"][k]["seconds"] for r in evo_runs] if "rehearsal" in methods else []
        cells.append(f"{np.median(ratio):.2f}×" if ratio else "-")
        lines.append(md_row(k, *cells))
    if evo_runs:
        steps = ("install", "reevaluate", "start", "evolve", "export")
        lines += ["", "**Where evo's time went** (wall seconds per version, seed " + str(evo_runs[0]["seed"]) +
                  "; install = the adapter fit and shipping the version's data to the evaluators; other = "
                  "noticing the shard, reading and de-duplicating it, checkpoints):", "",
                  md_head("version", "decision", *steps, "other", align="ll" + "r" * (len(steps) + 1))]
        for k, r in enumerate(evo_runs[0]["rows"]):
            st = r.get("steps_seconds") or {}
            other = r["seconds"] - sum(st.get(x, 0) for x in steps)
            lines.append(md_row(k, r["decision"], *(f"{st.get(x, 0):.0f}" for x in steps), f"{other:.0f}"))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shards = [v["shard"] for v in results["versions"]]
    x = np.arange(len(shards))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    series = [(METHODS[m], results[m], style) for m, style in
              zip(METHODS, ("C1-s", "C2--d", "C3-.v", "C4:x")) if m in results]
    for ax, title in zip(axes, ("newest shard", "mean over older shards", "general-domain text")):
        for label, rows, style in series + [(f"evo seed {r['seed']}", r["rows"], "C0-^") for r in results.get("evo", [])]:
            ys = []
            for k, s in enumerate(shards):
                if title == "newest shard":
                    ys.append(mean(rows[k]["nll"][s]))
                elif title == "general-domain text":
                    ys.append(mean(rows[k]["nll"]["general"]))
                else:
                    ys.append(np.mean([mean(rows[k]["nll"][o]) for o in shards[:k]]) if k else np.nan)
            ax.plot(x, np.exp(ys), style, label=label, alpha=0.8)
        if title == "newest shard":
            ax.plot(x, [math.exp(mean(results["base"][s])) for s in shards], "k:o", label="base")
        if title == "general-domain text":
            ax.axhline(math.exp(mean(results["base"]["general"])), color="k", ls=":", label="base")
        ax.set_title(title)
        ax.set_xticks(x, [f"{k}\n{s.split('.')[0]}" for k, s in enumerate(shards)])
        ax.set_ylabel("perplexity (held-out)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M on a stream of shards: lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = open("/proc/cpuinfo").read()
                isa = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
                return f"{name} ({isa}), {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(ROOT / "zoo-smollm2"), help="a zoo built by experiments/smollm2_zoo.py")
    p.add_argument("--out", default=str(OUT / "stream-smollm2"))
    p.add_argument("--only", choices=["baselines", "evo", "table"], help="run one part (results.json keeps the rest)")
    p.add_argument("--methods", default=",".join(METHODS), help="baselines to run")
    p.add_argument("--shards", default="it,c,es,fr", help="one shard per domain, in arrival order")
    p.add_argument("--general", default="doc", help="general-domain text the base is good at (never a shard)")
    p.add_argument("--docs", type=int, default=60, help="documents per shard")
    p.add_argument("--doc-chars", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--heldout-frac", type=float, default=0.15)
    p.add_argument("--split-seed", type=int, default=0, help="seed of every shard's held-out split (fixed over seeds)")
    p.add_argument("--measure-blocks", type=int, default=32, help="held-out blocks per shard in the tables")
    p.add_argument("--steps", type=int, default=24, help="training steps per version, every method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate (baselines and evo's adapter)")
    p.add_argument("--ft-lr", type=float, default=5e-5, help="full fine-tuning learning rate")
    p.add_argument("--rehearsal", type=float, default=0.5, help="rehearsal share (baseline and evo's adapter)")
    p.add_argument("--replay-train-blocks", type=int, default=128, help="rehearsal pool: blocks per older stratum")
    p.add_argument("--seeds", default="0,1,2", help="evo's search seeds")
    p.add_argument("--baseline-seeds", default="0", help="seeds of the baselines' fits (0 is the tables' row)")
    p.add_argument("--population", type=int, default=6)
    p.add_argument("--generations", type=int, default=2, help="generations per version")
    p.add_argument("--eval-blocks", type=int, default=12, help="newest held-out blocks per candidate")
    p.add_argument("--replay-blocks", type=int, default=32, help="replay blocks per candidate (all strata)")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--evaluators", type=int, default=2)
    p.add_argument("--object-store-mb", type=int, default=4096)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the baselines")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    mine: set[str] = set()  # keys this process wrote: parts may run at once in separate processes

    def save():
        on_disk = json.loads(results_path.read_text()) if results_path.exists() else {}
        on_disk.update({k: results[k] for k in mine | {"args", "machine", "versions"} if k in results})
        results.update(on_disk)
        tmp = results_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(on_disk))
        os.replace(tmp, results_path)

    data = prepare(args)
    results["args"] = vars(args)
    results["machine"] = cpu_name()
    results["versions"] = [{"version": v["version"], "shard": v["shard"], "train_blocks": len(v["train"]),
                            "heldout_blocks": len(v["heldout"])} for v in data["versions"]]
    print(f"{results['machine']}; shards: " + ", ".join(f"{v['shard']} ({v['train_blocks']} train / "
                                                       f"{v['heldout_blocks']} measured blocks)" for v in results["versions"]), flush=True)
    if args.only in (None, "baselines"):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        base = AutoModelForCausalLM.from_pretrained(data["zoo"].base_dir, dtype=torch.float32)
        results["base"] = measure(base, data, len(data["versions"]) - 1)
        mine.add("base")
        del base
        for m in args.methods.split(","):
            for seed in map(int, args.baseline_seeds.split(",")):
                print(f"{METHODS[m]}, seed {seed}:", flush=True)
                rows = run_baseline(m, data, args, seed)
                if seed == 0:  # seed 0 is the method's row in every table; others give its spread
                    results[m] = rows
                    mine.add(m)
                else:
                    results.setdefault(f"{m}_seeds", {})[str(seed)] = rows
                    mine.add(f"{m}_seeds")
                save()
    if args.only in (None, "evo"):
        runs = {r["seed"]: r for r in results.get("evo", [])}
        for seed in map(int, args.seeds.split(",")):
            print(f"evo, seed {seed}:", flush=True)
            runs[seed] = run_evo(data, args, seed)
            results["evo"] = [runs[s] for s in sorted(runs)]
            mine.add("evo")
            save()
    save()
    if args.only in (None, "baselines") and args.methods == "rehearsal" and args.baseline_seeds != "0":
        return 0  # extra seeds of one baseline: the table is made by a run that has them all
    if "base" in results and "rehearsal" in results:
        text = summarise(results, args)
        write_text(out / "table.md", text + "\n")
        plot(results, out / "bench_stream.png")
        print("\n" + text)
        print(f"\n{results['machine']}; {time.strftime('%Y-%m-%d')}; table: {out / 'table.md'}; plot: {out / 'bench_stream.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
