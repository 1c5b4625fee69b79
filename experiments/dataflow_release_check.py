"""A data-flow run's release, rebuilt by mergekit-yaml from its own mergekit.yaml (issue 24).

    python experiments/dataflow_release_check.py --zoo zoo-smollm2 --space search_spaces/dataflow_layers.yaml

Runs ``evo run`` on the zoo over a data-flow space (small budget: the point is the release, not
the search), exports the best evolved path (``candidate="best-evolved"``: a path even when a
simple baseline won selection), checks it with ``evo verify`` (plain transformers, objectives
re-measured), then runs ``mergekit-yaml`` on the release's ``mergekit.yaml`` with its portable model
names pointed back at the zoo, and compares: tensor names, the largest absolute difference of any
tensor, depth, and the per-block losses of both models on test blocks of the zoo.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True)
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "dataflow_layers.yaml"))
    p.add_argument("--repeats", type=int, default=None, help="override the space's dataflow.repeats")
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the run and release under this folder")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import evo
    from evo.artifacts.release import verify
    from evo.scoring.fitness import block_nlls

    zoo = Path(args.zoo).resolve()
    work = Path(args.keep or tempfile.mkdtemp(prefix="dataflow-check-"))
    work.mkdir(parents=True, exist_ok=True)
    space = yaml.safe_load(Path(args.space).read_text())
    if args.repeats:
        space["dataflow"]["repeats"] = args.repeats
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    cfg = {"name": "dataflow-check", "zoo": str(zoo), "search_space": str(work / "space.yaml"), "seed": args.seed,
           "eval": {"seq_len": 128, "max_blocks": args.blocks, "batch_size": 8,
                    "selection": {"blocks": args.blocks}, "test_blocks": args.blocks},
           "optimizer": {"name": "cmaes", "generations": args.generations, "population": args.population},
           "ray": {"evaluators": 2, "dashboard": False}}
    t0 = time.time()
    evo.run(cfg, work / "run", quiet=True)
    t_run = time.time() - t0
    release = evo.export(work / "run", work / "release", candidate="best-evolved")
    recipe = yaml.safe_load((release / "recipe.yaml").read_text())
    steps = recipe["path"]["steps"]
    verified = verify(release)
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        print("dataflow_release_check: mergekit-yaml is not installed (pip install 'evo[test]')", file=sys.stderr)
        return 2
    text = (release / "mergekit.yaml").read_text().replace(f"{zoo.name}/", f"{zoo}/")
    (work / "mk.yaml").write_text(text)
    t1 = time.time()
    subprocess.run([exe, str(work / "mk.yaml"), str(work / "mk_out"), "--no-lazy-unpickle"], check=True,
                   capture_output=True)
    t_mk = time.time() - t1
    ref = {}
    for f in (work / "mk_out").glob("*.safetensors"):
        ref.update(load_file(str(f)))
    got = load_file(str(release / "model.safetensors"))
    worst = max(float((got[n].float() - ref[n].float()).abs().max()) for n in ref) if set(ref) == set(got) else None
    ours = AutoModelForCausalLM.from_pretrained(release).eval()
    theirs = AutoModelForCausalLM.from_pretrained(work / "mk_out").eval()
    from transformers import AutoTokenizer

    from evo.data.text import read_texts
    from evo.data.tokens import token_blocks

    tok = AutoTokenizer.from_pretrained(release)
    tests = sorted(zoo.glob("data/*/test.jsonl"))
    blocks = torch.cat([token_blocks(read_texts(f), tok, 128, 4) for f in tests])
    a, b = block_nlls(ours, blocks).numpy(), block_nlls(theirs, blocks).numpy()
    used = {}
    for s in steps:
        used[s["model"]] = used.get(s["model"], 0) + 1
    rows = {
        "zoo": str(zoo), "space": Path(args.space).name, "run wall s": round(t_run), "mergekit-yaml wall s": round(t_mk),
        "base layers": recipe["path"]["num_layers"], "release layers": json.loads((release / "config.json").read_text())["num_hidden_layers"],
        "path steps": len(steps), "layers per model": used, "scaled steps": sum(s["scale"] != 1.0 for s in steps),
        "evo verify": {k: round(v, 4) for k, v in verified.items()},
        "same tensor names": set(ref) == set(got), "largest |Δ| of any tensor": worst,
        "test blocks": len(blocks), "largest |Δ| per-block loss (transformers, evo vs mergekit build)": float(np.abs(a - b).max()),
        "mean test loss": round(float(a.mean()), 4),
    }
    for k, v in rows.items():
        print(f"{k:<64} {v}")
    return 0 if worst is not None and worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
