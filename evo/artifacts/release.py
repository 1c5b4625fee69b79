"""Export the fittest recipe of a run as a release: a Hugging Face directory plain
``transformers`` loads, with the recipe (evo and mergekit YAML), its fitness, a model card and a
sha256 manifest. Built in a hidden staging folder and renamed into place; never overwritten.

The pieces have their own modules: the fitness record (``fitness``), the card (``card``), the
manifest (``manifest``), portable names (``portable``) and ``evo verify`` (``verify``).
"""
from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import yaml

from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.core.fs import atomic_write_text, staged_dir
from evo.zoo.gguf import model_dirs
from evo.search.recipe import Recipe
from evo.artifacts.card import render_card
from evo.artifacts.fitness import EVAL_BLOCKS, FitnessRecord, selection_fitness, shipped_fitness
from evo.artifacts.lock import RunLock
from evo.artifacts.manifest import write_manifest
from evo.artifacts.portable import portable_mergekit
from evo.artifacts.store import RunStore
from evo.artifacts.verify import verify  # noqa: F401  (experiments/dataflow_release_check.py imports it from here)

RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CANDIDATES = ("release", "best-evolved")


def next_release_dir(store: RunStore) -> Path:
    existing = [int(m.group(1)) for p in store.releases_dir.glob("v*") if (m := re.fullmatch(r"v(\d{4})", p.name))]
    return store.releases_dir / f"v{max(existing, default=0) + 1:04d}"


def export(run_dir: str | Path, out: str | Path | None = None, *, lora: str = "merged", name: str | None = None,
           candidate: str = "release") -> Path:
    """Materialise the run's release into ``out`` (default ``RUN_DIR/releases/vNNNN``).

    ``candidate``: ``"release"`` (what the selection stage chose: an evolved recipe or, when none
    beat it on the selection split, the best simple baseline) or ``"best-evolved"`` (the best
    evolved recipe on the selection split even where a baseline was released; its card says so).

    A recipe with LoRA genes is re-fitted with its seed on the run's training data; ``lora``
    ``"merged"`` folds the adapter into the weights, ``"adapter"`` keeps the merge as the model and
    writes the PEFT adapter to ``adapter/`` beside it. A stream run's releases are written by the
    loop itself (:func:`write_release`); exporting one by hand re-exports its newest release.
    """
    if lora not in ("merged", "adapter"):
        raise EvoError(f"lora: must be 'merged' or 'adapter', got {lora!r}")
    if candidate not in CANDIDATES:
        raise EvoError(f"candidate: must be one of {', '.join(CANDIDATES)}, got {candidate!r}")
    if name is not None:
        if out is not None:
            raise EvoError("give a release directory or a release name, not both")
        if not RELEASE_NAME.fullmatch(name):
            raise EvoError(f"release name {name!r}: use letters, digits, '.', '_' and '-' only "
                           "(no path separators; it names a folder under RUN_DIR/releases)")
    store = RunStore.open(run_dir)
    with RunLock(store.root, "export"):  # refused while a driver works in the run (its checkpoint moves)
        return _export(store, out, lora=lora, name=name, candidate=candidate)


def _export(store: RunStore, out, *, lora: str, name: str | None, candidate: str) -> Path:
    if name is not None:
        out = store.releases_dir / name
    ckpt = store.load_checkpoint()
    if not ckpt or not ckpt.best:
        raise EvoError(f"{store.root}: no complete generation to export yet")
    cfg = ExperimentConfig.from_dict(store.config(), source=str(store.root / RunStore.CONFIG))
    if ckpt.is_stream:
        current = ckpt.stream.get("release_dir")
        raise EvoError(f"{store.root}: a stream run writes its releases itself; "
                       + (f"the current release is {current}: ship that folder" if current
                          else f"none was released yet (see {store.releases_dir})"))
    selection = ckpt.selection
    if not selection or not selection.get("release_recipe"):
        raise EvoError(f"{store.root}: the run has not finished: its release is chosen on the selection split after "
                       f"the last generation; continue it with `evo resume {store.root}`")
    label = selection["release"] if candidate == "release" else selection.get("best_evolved")
    stored = selection["release_recipe"] if candidate == "release" else selection.get("best_evolved_recipe")
    if not stored:
        raise EvoError(f"{store.root}: the selection stage recorded no evolved recipe to export "
                       f"(runs made before evo recorded one: export the release instead)")
    recipe = Recipe.from_dict(stored, source=str(store.root / RunStore.CHECKPOINT))
    if lora == "adapter" and not recipe.lora:
        hint = ("; `--candidate best-evolved` exports the best evolved recipe" if candidate == "release"
                and selection.get("release_kind") != "evolved" and selection.get("best_evolved") else "")
        raise EvoError(f"{store.root}: {label} has no LoRA genes, so there is no adapter to write: "
                       f"export it without --lora adapter{hint}")
    paths = model_dirs(cfg.models)
    from evo.scoring.sources import load_tokenizer, search_and_selection, train_blocks

    tok = load_tokenizer(cfg)
    train = train_blocks(cfg, tok) if recipe.lora else None
    # the blocks the release's recorded fitness was measured on, so `evo verify` re-measures exactly those
    search, held = search_and_selection(cfg, tok)
    blocks = held if selection.get("split") == "selection" else search
    fitness = selection_fitness(cfg, ckpt, store, label)
    out = write_release(store, cfg, recipe, paths, fitness, out=out, lora=lora, train=train, eval_blocks=blocks)
    store.event("exported", release=str(out), recipe_key=recipe.key(), values=fitness.objectives)
    return out


def write_release(store: RunStore, cfg: ExperimentConfig, recipe: Recipe, paths: dict[str, str],
                  fitness: FitnessRecord, *, out: str | Path | None = None, lora: str = "merged", train=None,
                  eval_blocks: dict | None = None) -> Path:
    """Build a release of ``recipe`` in a hidden staging folder and rename it into place.

    ``fitness``: what the card and ``fitness.json`` record (objectives, data version, ...).
    ``train``: the token blocks the recipe's LoRA genes are fitted on (same seed, same data
    as in the evaluator). ``eval_blocks``: ``{set: int64 blocks}`` written to
    ``eval/blocks.safetensors``, so ``evo verify`` can re-measure a stream release whose data
    lives in no single file.
    """
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
    with staged_dir(out, create=False) as staging:  # the merge creates the folder
        _materialise(recipe, paths, staging)
        if recipe.lora:
            if train is None or not len(train):
                raise EvoError(f"{cfg.source}: the recipe has LoRA genes but no training data is configured")
            _apply_lora(recipe, train, staging, lora)
        if eval_blocks:
            from safetensors.numpy import save_file

            (staging / EVAL_BLOCKS).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: np.ascontiguousarray(v, dtype=np.int64) for k, v in eval_blocks.items()},
                      str(staging / EVAL_BLOCKS))
            fitness = dataclasses.replace(fitness, eval_blocks=EVAL_BLOCKS)
        fitness = shipped_fitness(fitness, cfg, store, staging)
        previous = _previous_release(store, out)
        if previous:
            fitness = dataclasses.replace(fitness, previous_release={
                "name": previous["name"], "objectives": previous["objectives"], "data_version": previous["data_version"]})
        _write_release_files(staging, recipe, paths, cfg, fitness.to_dict())
    return out


def _materialise(recipe: Recipe, paths: dict[str, str], target: Path) -> None:
    from evo.merge import merge_to_dir

    def resolve(name: str) -> Path:
        if name not in paths:
            raise EvoError(f"recipe names model {name!r}, which the run's config does not define")
        return Path(paths[name])

    # the sources rounded as the evaluators held them: the release is the model that was measured
    # a data-flow recipe is built from its mergekit form (slices): a release may be deeper or
    # shallower than the base
    merge_to_dir(recipe.mergekit(), target, resolve=resolve, seed=recipe.seed, source_dtype=recipe.merge.dtype)


def _apply_lora(recipe: Recipe, train, target: Path, mode: str) -> None:
    """Re-fit the recipe's LoRA on the merged model exactly as the evaluator did (same seed, data)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from evo.scoring.lora import LoraGenes, fit_lora, merged_state_dict, save_adapter

    model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=False)
    peft_model, _ = fit_lora(model, train, LoraGenes.from_dict(recipe.lora), seed=recipe.seed)
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


def _write_release_files(root: Path, recipe: Recipe, paths: dict, cfg: ExperimentConfig, fitness: dict) -> None:
    """fitness.json, the recipe (evo and mergekit YAML), the card, and last the manifest."""
    atomic_write_text(root / "fitness.json", json.dumps(fitness, indent=2))
    atomic_write_text(root / "recipe.yaml", yaml.safe_dump({**recipe.to_dict(), "key": recipe.key()}, sort_keys=False))
    # mergekit form: model names replaced by portable names of their directories (the builder's
    # paths stay out of a shipped release; point them at local copies)
    atomic_write_text(root / "mergekit.yaml", "# model paths are portable names: replace them with your local copies\n"
                      + yaml.safe_dump(portable_mergekit(recipe, paths, cfg), sort_keys=False))
    atomic_write_text(root / "README.md", render_card(recipe, paths, fitness, cfg))
    write_manifest(root)
