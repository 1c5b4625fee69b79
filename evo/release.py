"""Export the fittest recipe of a run as a release: a Hugging Face directory plain
``transformers`` loads, with the recipe (evo and mergekit YAML), its fitness, a model card and a
sha256 manifest. Built in a hidden temp directory and renamed into place; never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from evo.config import ExperimentConfig
from evo.errors import EvoError
from evo.space import Recipe
from evo.store import RunStore, atomic_write_text

MANIFEST = "MANIFEST.sha256"


def next_release_dir(store: RunStore) -> Path:
    existing = [int(m.group(1)) for p in store.releases_dir.glob("v*") if (m := re.fullmatch(r"v(\d{4})", p.name))]
    return store.releases_dir / f"v{max(existing, default=0) + 1:04d}"


def export(run_dir: str | Path, out: str | Path | None = None, *, lora: str = "merged") -> Path:
    """Materialise the best recipe of ``run_dir`` into ``out`` (default ``RUN_DIR/releases/vNNNN``).

    A recipe with LoRA genes is re-fitted with its seed on the run's training data; ``lora``
    ``"merged"`` folds the adapter into the weights, ``"adapter"`` keeps the merge as the model and
    writes the PEFT adapter to ``adapter/`` beside it.
    """
    if lora not in ("merged", "adapter"):
        raise EvoError(f"lora: must be 'merged' or 'adapter', got {lora!r}")
    store = RunStore.open(run_dir)
    ckpt = store.load_checkpoint()
    if not ckpt or not ckpt.get("best"):
        raise EvoError(f"{store.root}: no complete generation to export yet")
    cfg = ExperimentConfig.from_dict(store.config(), source=str(store.root / RunStore.CONFIG))
    out = Path(out) if out is not None else next_release_dir(store)
    if out.exists():
        raise EvoError(f"{out}: release already exists (releases are never overwritten)")
    if "/" in out.name or out.name in ("", ".", ".."):
        raise EvoError(f"{out}: not a valid release name")
    try:  # probe: a read-only target fails here, before any merging
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out.parent).cleanup()
    except OSError as exc:
        raise EvoError(f"{out.parent}: target folder is not writable ({exc.strerror})") from None
    recipe = Recipe.from_dict(ckpt["best"]["recipe"], source=str(store.root / RunStore.CHECKPOINT))
    paths = {"base": cfg.models.base, **cfg.models.sources}
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        _materialise(recipe, paths, staging)
        if recipe.lora:
            _apply_lora(recipe, cfg, staging, lora)
        _write_release_files(staging, recipe, paths, cfg, ckpt, store, previous=_previous_release(store, out))
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    store.event("exported", release=str(out), recipe_key=recipe.key(), values=ckpt["best"]["values"])
    return out


def _materialise(recipe: Recipe, paths: dict[str, str], target: Path) -> None:
    from evo.merge import merge_to_dir

    def resolve(name: str) -> Path:
        if name not in paths:
            raise EvoError(f"recipe names model {name!r}, which the run's config does not define")
        return Path(paths[name])

    merge_to_dir(recipe.merge, target, resolve=resolve, seed=recipe.seed)


def _apply_lora(recipe: Recipe, cfg: ExperimentConfig, target: Path, mode: str) -> None:
    """Re-fit the recipe's LoRA on the merged model exactly as the evaluator did (same seed, data)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo.lora import LoraGenes, fit_lora, merged_state_dict, save_adapter
    from evo.sources import train_blocks

    model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    import torch

    blocks = train_blocks(cfg, tokenizer)
    if blocks is None:
        raise EvoError(f"{cfg.source}: eval.train_sets: the recipe has LoRA genes but no training data is configured")
    peft_model, _ = fit_lora(model, torch.from_numpy(blocks), LoraGenes.from_dict(recipe.lora), seed=recipe.seed)
    if mode == "adapter":
        save_adapter(peft_model, target / "adapter")
        return
    weights = {k: v.contiguous() for k, v in merged_state_dict(peft_model).items()}
    for f in target.glob("model*.safetensors"):
        f.unlink()
    (target / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})


def _previous_release(store: RunStore, out: Path) -> dict | None:
    """fitness.json of the newest release before ``out`` in this run, for the card's comparison."""
    earlier = sorted(p for p in store.releases_dir.glob("v[0-9][0-9][0-9][0-9]") if p.name < out.name)
    if not earlier or not (earlier[-1] / "fitness.json").is_file():
        return None
    return {"name": earlier[-1].name, **json.loads((earlier[-1] / "fitness.json").read_text())}


def _write_release_files(root: Path, recipe: Recipe, paths: dict, cfg: ExperimentConfig, ckpt: dict, store: RunStore,
                         previous: dict | None = None) -> None:
    from evo.reporting import lineage

    best = ckpt["best"]
    objectives = ckpt["objectives"]
    fitness = {
        "objectives": {o["name"]: {"value": v, "goal": o["goal"]} for o, v in zip(objectives, best["values"])},
        "data_version": ckpt["data_version"],
        "generation": ckpt["generation"],
        "run": str(store.root.resolve()),
        "eval": {
            "sets": {k: str(Path(v).resolve()) for k, v in cfg.eval.sets.items()},
            "seq_len": cfg.eval.seq_len, "max_blocks": cfg.eval.max_blocks, "batch_size": cfg.eval.batch_size,
        },
        "objective_specs": objectives,
        "data_inputs": ckpt.get("data_inputs", {}),
    }
    if "comparison" in ckpt:
        fitness["comparison"] = ckpt["comparison"]
    fitness["lineage"] = [
        {"candidate": c["candidate"], "generation": c["generation"], "parents": c.get("parents") or [], "values": c.get("values")}
        for c in lineage(store.candidates(), best.get("id"))
    ]
    if previous:
        fitness["previous_release"] = {"name": previous["name"], "objectives": previous["objectives"],
                                       "data_version": previous["data_version"]}
    atomic_write_text(root / "fitness.json", json.dumps(fitness, indent=2))
    atomic_write_text(root / "recipe.yaml", yaml.safe_dump({**recipe.to_dict(), "key": recipe.key()}, sort_keys=False))
    # mergekit form: the same merge with model names replaced by their directories
    mk = recipe.merge.to_dict()
    mk["base_model"] = str(Path(paths["base"]).resolve())
    for entry in mk["models"]:
        entry["model"] = str(Path(paths[entry["model"]]).resolve())
    atomic_write_text(root / "mergekit.yaml", yaml.safe_dump(mk, sort_keys=False))
    atomic_write_text(root / "README.md", _card(recipe, paths, fitness, cfg))
    write_manifest(root)


def _card(recipe: Recipe, paths: dict, fitness: dict, cfg: ExperimentConfig) -> str:
    lines = [
        f"# {cfg.name}: evolved merge",
        "",
        f"A `{recipe.merge.merge_method}` merge of {len(recipe.merge.models)} models over a common base, "
        "found by evo's evolutionary search.",
        "",
        "## Parent models",
        "",
        f"- base: `{paths['base']}`",
        *[f"- {e.model}: `{paths[e.model]}`" for e in recipe.merge.models],
        "",
        f"## Fitness (data version `{fitness['data_version']}`, generation {fitness['generation']})",
        "",
        "| objective | goal | value |",
        "|---|---|---|",
        *[f"| {n} | {o['goal']} | {o['value']:.4f} |" for n, o in fitness["objectives"].items()],
    ]
    prev = fitness.get("previous_release")
    if prev:
        lines += ["", f"## Against the previous release ({prev['name']}, data `{prev['data_version']}`)", "",
                  "| objective | previous | this |", "|---|---|---|"]
        for n, o in fitness["objectives"].items():
            old = prev["objectives"].get(n, {}).get("value")
            lines.append(f"| {n} | {'-' if old is None else f'{old:.4f}'} | {o['value']:.4f} |")
    comp = fitness.get("comparison")
    if comp:
        coll = "test" if any("test" in v for v in comp.values()) else "valid"
        sets = list(cfg.eval.sets)
        lines += ["", f"## Comparison (log-perplexity, {coll} split)", "",
                  "| model | " + " | ".join(sets) + " | mean |", "|---" * (len(sets) + 2) + "|"]
        for label, colls in comp.items():
            m = colls.get(coll, {})
            if "error" not in m and m:
                lines.append(f"| {label} | " + " | ".join(f"{m[f'logppl/{s}']:.4f}" for s in sets) + f" | {m['mean']:.4f} |")
    if fitness.get("lineage"):
        lines += ["", "## Lineage", "", "Ancestors of this candidate back to the first generation:", "",
                  "| generation | candidate | parents | " + " | ".join(fitness["objectives"]) + " |",
                  "|---|---|---|" + "---|" * len(fitness["objectives"])]
        for c in fitness["lineage"]:
            vals = " | ".join(f"{v:.4f}" for v in c["values"]) if c["values"] else "failed"
            lines.append(f"| {c['generation']} | {c['candidate']} | {', '.join(c['parents']) or '-'} | {vals} |")
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
        "`mergekit.yaml` holds the same merge for `mergekit-yaml`; `evo merge mergekit.yaml OUT` rebuilds it.",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIR")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")',
        "```",
        "",
        f"Check it with `evo verify PATH/TO/THIS/DIR` (sha256 of every file in `{MANIFEST}`).",
        "",
    ]
    return "\n".join(lines)


def write_manifest(root: Path) -> None:
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        entries.append(f"{_sha256(path)}  {path.relative_to(root).as_posix()}")
    atomic_write_text(root / MANIFEST, "\n".join(entries) + "\n")


def verify_manifest(root: str | Path) -> None:
    """Raise EvoError naming the first missing or altered file."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise EvoError(f"{root}: no {MANIFEST}")
    for line in manifest.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        path = root / rel
        if not path.is_file():
            raise EvoError(f"{path}: listed in {MANIFEST} but missing")
        if _sha256(path) != digest:
            raise EvoError(f"{path}: sha256 does not match {MANIFEST}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(release: str | Path, tolerance: float = 1e-3) -> dict[str, float]:
    """Check the manifest, load the model with plain transformers, and re-measure every
    objective on the recorded data. Returns the re-measured values; raises EvoError otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo.config import Objective
    from evo.data import data_version, read_texts
    from evo.fitness import mean_nll, objective_values, token_blocks

    root = Path(release)
    if not root.is_dir():
        raise EvoError(f"{root}: release directory not found")
    verify_manifest(root)
    fitness = json.loads((root / "fitness.json").read_text())
    ev = fitness["eval"]
    try:
        model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except Exception as exc:  # any load failure is a broken release
        raise EvoError(f"{root}: model does not load ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    inputs = fitness.get("data_inputs") or {"files": list(ev["sets"].values()),
                                             "settings": dict(seq_len=ev["seq_len"], max_blocks=ev["max_blocks"])}
    for path in inputs["files"]:
        if not Path(path).is_file():
            raise EvoError(f"{path}: recorded evaluation data is missing")
    version = data_version(inputs["files"], **inputs["settings"], tokenizer=tokenizer.vocab_size)
    if version != fitness["data_version"]:
        raise EvoError(f"{root}: evaluation data changed since export ({version} != {fitness['data_version']})")
    metrics = {
        f"logppl/{name}": mean_nll(model, token_blocks(read_texts(path), tokenizer, ev["seq_len"], ev["max_blocks"]),
                                   batch_size=ev["batch_size"])
        for name, path in ev["sets"].items()
    }
    objectives = [Objective(**o) for o in fitness["objective_specs"]]
    values = objective_values(metrics, objectives, list(ev["sets"]))
    for obj, value in zip(objectives, values):
        recorded = fitness["objectives"][obj.name]["value"]
        if not abs(value - recorded) <= tolerance:
            raise EvoError(f"{root}: objective {obj.name} re-measured {value:.6f}, recorded {recorded:.6f} (tolerance {tolerance})")
    return dict(zip([o.name for o in objectives], values))
