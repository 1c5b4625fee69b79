"""Merge speed per method, in resident reused buffers, against this machine's copy bandwidth.

    python experiments/bench_merge.py            # ~125M and ~25M Llama-shaped models, 3 sources
    python experiments/bench_merge.py --quick    # 25M only, fewer repeats

Bandwidths count bytes *read*: a merge reads base + 3 task vectors; the copy reference is a large
``torch.add(x, y, out=z)`` into an already-touched buffer (2 arrays read), re-measured right
before each row because shared VMs drift by 2-5x within minutes. With mergekit installed,
also times ``merge_to_dir`` against ``mergekit-yaml`` on the same recipe and checks the tensors.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import md_head, md_row

import torch

from evo.merge import METHODS, MergeConfig, Merger, merge_to_dir

SIZES = {  # name -> (hidden, intermediate, layers, vocab)
    "125M": (768, 3072, 10, 16384),
    "25M": (384, 1536, 8, 8192),
    "15M": (320, 896, 8, 8192),    # the small zoo's shape
    "1.6M": (128, 384, 4, 3072),   # the tiny zoo's shape
}
RECIPE_PARAMS = {"weight": 0.5, "density": 0.5}
EXTRA = {"slerp": {"t": 0.4}, "della": {"epsilon": 0.1}, "della_linear": {"epsilon": 0.1}}


def llama_shapes(hidden, inter, layers, vocab) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_sources(shapes, n_models=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    deltas = {f"m{i}": {n: torch.randn(s, generator=g) * 0.002 for n, s in shapes.items()} for i in range(n_models)}
    return base, deltas


def recipe(method: str, models: list[str]) -> MergeConfig:
    m = METHODS[method]
    per_model = {p.name for p in m.params if p.per_model}
    count = m.max_models or len(models)
    entries = [{"model": x, "parameters": {k: v for k, v in RECIPE_PARAMS.items() if k in per_model}}
               for x in models[:count]]
    d = {"merge_method": method, "models": entries, "parameters": EXTRA.get(method, {})}
    if m.needs_base:  # linear would make a named base a fourth input
        d["base_model"] = "base"
    return MergeConfig.from_dict(d)


def copy_bandwidth(numel=64 * 2**20, reps=5) -> float:
    x, y, z = torch.ones(numel), torch.ones(numel), torch.zeros(numel)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.add(x, y, out=z)
        times.append(time.perf_counter() - t0)
    return 2 * numel * 4 / statistics.median(times[1:]) / 1e9


def time_merges(merger, cfg, reps) -> float:
    merger.merge(cfg, seed=0)  # warm-up: touches scratch, fills the stats cache
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        merger.merge(cfg, seed=r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_model_dir(path: Path, sd, dims) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, inter, layers, vocab = dims
    path.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)


def tied_entries(gaps, base, deltas, density=RECIPE_PARAMS["density"]) -> int:
    """How many differing entries sit exactly on some source's magnitude threshold that more than
    one entry shares: TIES output entry i depends only on the sources' entry i, so such an entry
    differs only because evo keeps every tied magnitude and mergekit's argsort an arbitrary subset."""
    count = 0
    for name, gap in gaps.items():
        idx = (gap > 1e-6).reshape(-1).nonzero().flatten()
        if not len(idx):
            continue
        tied = torch.zeros(len(idx), dtype=torch.bool)
        for d in deltas.values():
            # the task vector as evo and mergekit see it: (base + d) - base, rounded like the files
            mag = ((base[name] + d[name]) - base[name]).reshape(-1).abs()
            k = max(1, int(density * mag.numel()))
            thr = mag.kthvalue(mag.numel() - k + 1).values
            if int((mag == thr).sum()) > 1:
                tied |= mag[idx] == thr
        count += int(tied.sum())
    return count


def end_to_end(methods, dims, base, deltas) -> list[str]:
    from safetensors.torch import load_file

    exe = shutil.which("mergekit-yaml")
    if exe is None:
        return ["mergekit-yaml not installed: end-to-end comparison skipped"]
    rows = [md_head("method", "evo merge_to_dir s", "mergekit-yaml s", "speed-up", "max abs diff", "entries > 1e-6 apart")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model_dir(tmp / "base", base, dims)
        for m, d in deltas.items():
            write_model_dir(tmp / m, {n: base[n] + d[n] for n in base}, dims)
        for method in methods:
            cfg = recipe(method, list(deltas))
            d = cfg.to_dict()
            if "base_model" in d:
                d["base_model"] = str(tmp / "base")
            for e in d["models"]:
                e["model"] = str(tmp / e["model"])
            cfg = MergeConfig.from_dict(d)
            cfg.to_yaml(tmp / f"{method}.yaml")
            t0 = time.perf_counter()
            merge_to_dir(cfg, tmp / f"evo_{method}")
            t_evo = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = subprocess.run([exe, str(tmp / f"{method}.yaml"), str(tmp / f"mk_{method}")],
                                  capture_output=True, text=True)
            if done.returncode:
                rows.append(md_row(method, f"mergekit-yaml failed: {done.stderr.strip().splitlines()[-1][:120]}"))
                continue
            t_mk = time.perf_counter() - t0
            ours = load_file(str(tmp / f"evo_{method}" / "model.safetensors"))
            ref = {}
            for f in (tmp / f"mk_{method}").glob("*.safetensors"):
                ref.update(load_file(str(f)))
            gaps = {n: (ours[n].float() - ref[n].float()).abs() for n in ref}
            diff = max(g.max().item() for g in gaps.values())
            # a threshold tie (mergekit's argsort keeps an arbitrary subset of tied magnitudes)
            # shows as a handful of entries; a semantic difference as a whole tensor
            apart = sum(int((g > 1e-6).sum()) for g in gaps.values())
            total = sum(g.numel() for g in gaps.values())
            note = ""
            if method == "ties" and apart:
                note = f" ({tied_entries(gaps, base, deltas)} on a tied threshold)"
            rows.append(md_row(method, f"{t_evo:.2f}", f"{t_mk:.2f}", f"{t_mk / t_evo:.1f}x", f"{diff:.1e}",
                               f"{apart} of {total:,}{note}"))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="125M,25M", help=f"comma list of {','.join(SIZES)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="25M only, 2 repeats")
    ap.add_argument("--e2e-methods", default="linear,ties", help="methods timed against mergekit-yaml ('' = none)")
    ap.add_argument("--e2e-size", default="25M")
    ap.add_argument("--modes", default="resident,one-off", help="resident (evaluators) and/or one-off (evo merge)")
    args = ap.parse_args(argv)
    sizes = ["25M"] if args.quick else args.sizes.split(",")
    reps = 2 if args.quick else args.reps
    methods = [m for m in args.methods.split(",") if m]

    modes = [m for m in args.modes.split(",") if m]
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("resident = an evaluator's Merger (magnitude tables + fused consensus kernel, set up on the first "
          "merge: 'setup s'); one-off = `evo merge` (no per-source setup)\n")
    print(md_head("method", "size", "mode", "params", "s/merge", "setup s", "GB/s read", "copy GB/s", "% of copy"))
    for size in sizes:
        shapes = llama_shapes(*SIZES[size])
        base, deltas = random_sources(shapes)
        numel = sum(t.numel() for t in base.values())
        for mode in modes:
            merger = Merger(base, deltas, num_layers=SIZES[size][2], resident=(mode == "resident"))
            for method in methods:
                cfg = recipe(method, list(deltas))
                bw = copy_bandwidth(numel=32 * 2**20, reps=3)
                t0 = time.perf_counter()
                merger.merge(cfg, seed=0)
                setup = time.perf_counter() - t0
                sec = time_merges(merger, cfg, reps)
                n_src = (1 if cfg.base_model else 0) + len([e for e in cfg.models if e.model != "base"])
                gbs = n_src * numel * 4 / sec / 1e9
                print(md_row(method, size, mode, f"{numel / 1e6:.0f}M", f"{sec:.3f}", f"{max(setup - sec, 0):.1f}",
                             f"{gbs:.2f}", f"{bw:.1f}", f"{100 * gbs / bw:.0f}%"), flush=True)
            del merger
        del base, deltas
    e2e = [m for m in args.e2e_methods.split(",") if m]
    if e2e:
        dims = SIZES[args.e2e_size]
        base, deltas = random_sources(llama_shapes(*dims))
        print(f"\nEnd to end at {args.e2e_size} (load + merge + write):\n")
        print("\n".join(end_to_end(e2e, dims, base, deltas)))


if __name__ == "__main__":
    main()
