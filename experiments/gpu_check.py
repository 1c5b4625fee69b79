"""GPU check: evo's CUDA path end to end, in a few minutes, on whatever GPU is present.

    python experiments/gpu_check.py                   # on a GPU machine (~3-5 min)
    python experiments/gpu_check.py --device cpu --sizes tiny   # the same code path on CPU (smoke test)

1. Resident evaluators on the device, per model shape (synthetic Llama families from
   ``evo.zoo.synthetic``: base + 3 specialists, task arithmetic, 4 candidates after one warm-up) and
   dtype: merge s and forward s per candidate, candidates/min, peak device memory against the
   memory plan's per-GPU figure, and whether the plan kept the sources on the GPU or streamed them.
2. A real ``evo run`` with ``ray.gpus_per_evaluator: 1`` (1 generation x 4 candidates) on the
   smallest shape: the Ray path (actors placed on the GPU, the release exported).

Prints one table; writes ``experiments/out/gpu_check.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import LAYERWISE, OUT, md_head, md_row, write_json

import torch

from evo.zoo.synthetic import SHAPES, LlamaShape, write_family

SIZES = {**SHAPES, "tiny": LlamaShape(256, 4, 688, 4, 2, 4096)}


def bench_evaluator(family, zoo, dtype: str, device: str, candidates: int = 4) -> dict:
    import numpy as np

    from evo.loop.experiment import load_config
    from evo.scoring.evaluator import Evaluator
    from evo.cluster.memory import plan_for
    from evo.scoring.sources import Sources

    cfg = load_config(_config(family, zoo, dtype, gpus=1 if device == "cuda" else 0))
    plan = plan_for(cfg)
    sources = Sources.load(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ev = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, device=device,
                   batch_size=cfg.eval.batch_size, dtype=dtype, stream_sources=plan.stream_sources)
    rng = np.random.default_rng(0)
    merge, forward = [], []
    for i in range(candidates + 1):  # the first is a warm-up (kernels, allocator)
        w = {m: float(x) for m, x in zip(sources.deltas, rng.uniform(0.2, 0.8, len(sources.deltas)))}
        recipe = {"merge": {"merge_method": "task_arithmetic", "base_model": "base", "dtype": dtype,
                            "models": [{"model": m, "parameters": {"weight": v}} for m, v in w.items()]}, "seed": i}
        res = ev.evaluate(recipe)
        if res["status"] != "ok":
            raise SystemExit(f"candidate failed: {res.get('error')}")
        if i:
            merge.append(res["timings"]["merge_s"])
            forward.append(res["timings"]["ppl_s"])
    per = statistics.median(m + f for m, f in zip(merge, forward))
    out = {"dtype": dtype, "merge_s": statistics.median(merge), "forward_s": statistics.median(forward),
           "candidates_per_min": 60 / per, "plan_gpu_gib": plan.gpu_bytes / 2**30,
           "sources": "streamed" if plan.stream_sources else "on device"}
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del ev
    return out


def _config(family, zoo, dtype, gpus) -> dict:
    base, sources = family
    return {"models": {"base": str(base), "sources": {k: str(v) for k, v in sources.items()}},
            "search_space": str(LAYERWISE), "dtype": dtype,
            "eval": {"sets": {d: str(zoo.data_dir(d, "valid")) for d in zoo.domains}, "tokenizer": str(zoo.tokenizer_dir),
                     "seq_len": 256, "max_blocks": 8, "batch_size": 8, "redraw": False, "test_blocks": 4,
                     "selection": {"fraction": 0.0, "lambdas": [0.5]}},
            "optimizer": {"name": "random", "generations": 1, "population": 4},
            "ray": {"evaluators": 1, "gpus_per_evaluator": gpus, "dashboard": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="135M,1.1B")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/evo-gpu-check")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --device cpu for the smoke test)")
    import evo
    from evo.zoo.build import build_zoo

    work = Path(args.work)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device: {card}; torch {torch.__version__}", flush=True)
    zoo = build_zoo(work / "zoo", domains=("code", "c", "doc"), size="micro", seed=0, progress=False)
    rows = []
    for size in args.sizes.split(","):
        family = write_family(work / size, SIZES[size], sources=3, dtype="bfloat16", tokenizer=zoo.tokenizer_dir)
        for dtype in args.dtypes.split(","):
            row = {"size": size, **bench_evaluator(family, zoo, dtype, args.device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    smallest = args.sizes.split(",")[0]
    family = write_family(work / smallest, SIZES[smallest], sources=3, dtype="bfloat16", tokenizer=zoo.tokenizer_dir)
    t0 = time.perf_counter()
    run_dir = work / f"run-{int(time.time())}"
    result = evo.run(_config(family, zoo, "bfloat16", 1 if args.device == "cuda" else 0), run_dir, quiet=True)
    run = {"run": "evo run, gpus_per_evaluator 1" if args.device == "cuda" else "evo run (cpu)", "size": smallest,
           "wall_s": time.perf_counter() - t0, "best": result.best_values, "release": str(run_dir / "releases")}
    print(json.dumps(run), flush=True)
    head = md_head("model", "dtype", "sources", "merge s", "forward s", "candidates/min", "peak GPU GiB", "plan GPU GiB",
                   align="lllrrrrr")
    print("\n" + head.replace("\n", f"  ({card})\n", 1))
    for r in rows:
        print(md_row(r["size"], r["dtype"], r["sources"], f"{r['merge_s']:.3f}", f"{r['forward_s']:.3f}",
                     f"{r['candidates_per_min']:.1f}", f"{r.get('peak_gpu_gib', float('nan')):.2f}",
                     f"{r['plan_gpu_gib']:.2f}"))
    write_json(Path(args.out) / "gpu_check.json", {"device": card, "rows": rows, "run": run})


if __name__ == "__main__":
    main()
