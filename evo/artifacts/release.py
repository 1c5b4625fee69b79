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
import stat
import tempfile
from pathlib import Path

import numpy as np
import yaml

from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.data.draws import SPLIT_TEXT
from evo.zoo.gguf import model_dirs
from evo.zoo.gguf import MARKER as GGUF_MARKER
from evo.search.space import Recipe
from evo.artifacts.checkpoint import Checkpoint
from evo.artifacts.lock import RunLock
from evo.artifacts.store import RunStore

from evo.core.fs import atomic_write_text, umask_tree
MANIFEST = "MANIFEST.sha256"
EVAL_BLOCKS = "eval/blocks.safetensors"  # in a subfolder: loaders take every top-level *.safetensors as weights


def next_release_dir(store: RunStore) -> Path:
    existing = [int(m.group(1)) for p in store.releases_dir.glob("v*") if (m := re.fullmatch(r"v(\d{4})", p.name))]
    return store.releases_dir / f"v{max(existing, default=0) + 1:04d}"


RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


CANDIDATES = ("release", "best-evolved")


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
    fitness = _run_fitness(cfg, ckpt, store, label)
    out = write_release(store, cfg, recipe, paths, fitness, out=out, lora=lora, train=train, eval_blocks=blocks)
    store.event("exported", release=str(out), recipe_key=recipe.key(), values=fitness["objectives"])
    return out


def write_release(store: RunStore, cfg: ExperimentConfig, recipe: Recipe, paths: dict[str, str], fitness: dict, *,
                  out: str | Path | None = None, lora: str = "merged", train=None,
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
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
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
            fitness = {**fitness, "eval_blocks": EVAL_BLOCKS}
        fitness = _portable_fitness(fitness, cfg, store, staging)
        previous = _previous_release(store, out)
        _write_release_files(staging, recipe, paths, cfg, fitness, store, previous=previous)
        umask_tree(staging)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


TASKS_DIR = "eval/tasks"  # the task files a release was scored on, copied in (evo verify re-scores them)


def _portable_fitness(fitness: dict, cfg: ExperimentConfig, store: RunStore, staging: Path) -> dict:
    """fitness.json as shipped: what the release was evaluated on named by relative name and
    sha256, never by the builder's absolute paths (which leak a machine's layout and mean nothing
    elsewhere). Task files are copied into ``eval/tasks/`` so ``evo verify`` re-scores them from
    the release alone; evaluation text is in ``eval/blocks.safetensors`` already."""
    fitness = json.loads(json.dumps(fitness, default=str))  # a deep copy, plain JSON types
    if "run" in fitness:
        fitness["run"] = store.root.name
    ev = fitness.get("eval") or {}
    if ev.get("sets"):
        ev["sets_sha256"] = {n: _sha256(Path(p)) for n, p in ev["sets"].items() if Path(p).is_file()}
    if ev.get("tasks"):
        ev["tasks_sha256"] = {}
        for name, path in list(ev["tasks"].items()):
            ev["tasks"][name] = _copy_task(Path(path), name, staging)
            ev["tasks_sha256"][name] = _sha256(staging / ev["tasks"][name])
    inputs = fitness.get("data_inputs") or {}
    if inputs.get("files"):
        inputs["sha256"] = [_sha256(Path(p)) if Path(p).is_file() else None for p in inputs["files"]]

    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
            return portable_name(value, cfg)
        return value

    return portable(fitness)


def _copy_task(path: Path, name: str, staging: Path) -> str:
    """Copy a task YAML and its data file into the release; returns the YAML's relative path."""
    from evo.scoring.tasks.spec import TaskFile

    task = TaskFile.read(path)
    data = task.dataset()
    folder = staging / TASKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in task.data.items() if k not in ("dataset_kwargs", "dataset_path")}
    spec["dataset_file"] = f"{name}{data.suffix or '.jsonl'}"
    shutil.copyfile(data, folder / spec["dataset_file"])
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(spec, sort_keys=False))
    return f"{TASKS_DIR}/{name}.yaml"


def _run_fitness(cfg: ExperimentConfig, ckpt: Checkpoint, store: RunStore, label: str | None = None) -> dict:
    """fitness.json of a fixed-data run's release (or of ``label``, another row of the selection
    table): its values on the selection split (what ``evo verify`` re-measures), beside its search
    and test values, the margins over the best simple baseline, the comparison and the lineage."""
    sel = ckpt.selection
    label = label or sel["release"]
    objectives = ckpt.objectives
    split = sel.get("split") or "valid"
    row = sel["table"].get(label) or {}
    measured = row.get("selection") or row.get(split) or {}
    if "objectives" not in measured:
        dropped = (row.get("dropped") or ((sel.get("candidates") or {}).get(label) or {}).get("dropped") or {})
        if dropped:
            raise EvoError(f"{store.root}: {label!r} has no full {split} values: it was {dropped.get('reason', 'dropped from the selection race')}; "
                           "export the release or the best evolved recipe (evo export --candidate best-evolved)")
        if not row:
            raise EvoError(f"{store.root}: {label!r} is not a row of the run's selection table "
                           f"(rows: {', '.join(sel['table'])})")
        raise EvoError(f"{store.root}: {label!r} has no {split} values: "
                       f"its evaluation failed ({measured.get('error')})")
    values = [measured["objectives"][o["name"]] for o in objectives]
    if label == sel["release"]:
        kind, reason, margins = sel["release_kind"], sel["reason"], sel.get("margins", {})
    else:  # exported on request (evo export --candidate best-evolved); the card keeps the run's verdict
        kind = "evolved"
        reason = (f"exported on request as the best evolved recipe on the selection split; the run released "
                  f"{sel['release']} ({sel['reason']})")
        margins = {k.replace("best_evolved_vs", "release_vs", 1): m for k, m in (sel.get("margins") or {}).items()
                   if k.startswith("best_evolved_vs")}
    fitness = {
        "objectives": {o["name"]: {"value": v, "goal": o["goal"]} for o, v in zip(objectives, values)},
        "measured_on": split,
        "values_by_split": {k: row[k] if k == "search" else row[k].get("objectives")
                            for k in ("search", "selection", "test") if k in row},
        "release": {"label": label, "kind": kind, "reason": reason,
                    "best_baseline": sel.get("best_baseline"), "best_lambda": sel.get("best_lambda")},
        "margins": margins,
        "data_version": ckpt.data_version,
        "generation": ckpt.generation,
        "run": str(store.root.resolve()),
        "eval": eval_record(cfg),
        "objective_specs": objectives,
        "data_inputs": ckpt.data_inputs,
        "comparison": sel["table"],
    }
    best_id = (ckpt.best or {}).get("id")
    if kind == "evolved":
        best_id = label.rsplit("(", 1)[-1].rstrip(")")
    fitness["lineage"] = lineage_record(store, best_id) if kind == "evolved" else []
    return fitness


def lineage_record(store: RunStore, candidate: str | None) -> list[dict]:
    """fitness.json's lineage: ``candidate`` and its ancestors, from the run's candidate records."""
    from evo.artifacts.report import lineage

    return [{"candidate": c["candidate"], "generation": c["generation"], "parents": c.get("parents") or [],
             "values": c.get("values")} for c in lineage(store.candidates(), candidate)]


def eval_record(cfg: ExperimentConfig) -> dict:
    """fitness.json's account of how the release was evaluated (what `evo verify` redoes)."""
    return {
        "sets": {k: str(Path(v).resolve()) for k, v in cfg.eval.sets.items()},
        "tasks": {k: str(Path(v).resolve()) for k, v in cfg.eval.tasks.items()},
        "task_limit": cfg.eval.task_limit, "task_subset": cfg.eval.task_subset,
        "seq_len": cfg.eval.seq_len, "max_blocks": cfg.eval.max_blocks, "batch_size": cfg.eval.batch_size,
    }


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


def _write_release_files(root: Path, recipe: Recipe, paths: dict, cfg: ExperimentConfig, fitness: dict, store: RunStore,
                         previous: dict | None = None) -> None:
    if previous:
        fitness = {**fitness, "previous_release": {"name": previous["name"], "objectives": previous["objectives"],
                                                   "data_version": previous["data_version"]}}
    atomic_write_text(root / "fitness.json", json.dumps(fitness, indent=2))
    atomic_write_text(root / "recipe.yaml", yaml.safe_dump({**recipe.to_dict(), "key": recipe.key()}, sort_keys=False))
    # mergekit form: the same merge with model names replaced by portable names of their
    # directories (the builder's paths stay out of a shipped release; point them at local copies)
    mk = recipe.mergekit().to_dict()
    if "base_model" in mk:
        mk["base_model"] = portable_name(paths[mk["base_model"]], cfg)
    for entry in [*mk.get("models", []), *(src for sl in mk.get("slices", []) for src in sl["sources"])]:
        entry["model"] = portable_name(paths[entry["model"]], cfg)
    for sl in mk.get("slices", []):
        if "base_model" in sl:
            sl["base_model"] = portable_name(paths[sl["base_model"]], cfg)
    atomic_write_text(root / "mergekit.yaml", "# model paths are portable names: replace them with your local copies\n"
                      + yaml.safe_dump(mk, sort_keys=False))
    atomic_write_text(root / "README.md", _card(recipe, paths, fitness, cfg))
    write_manifest(root)


def portable_name(path: str, cfg: ExperimentConfig) -> str:
    """A parent model's name that does not leak the builder's directory layout: its path inside
    the zoo (``zoo/specialists/de``), the GGUF file it was converted from, or its folder name."""
    p = Path(path)
    marker = p / GGUF_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            return f"{info['file']} (GGUF, sha256 {info['sha256'][:16]})"
        except (ValueError, KeyError, TypeError):
            pass
    if cfg.zoo:
        zoo = Path(cfg.zoo).resolve()
        try:
            return f"{zoo.name}/{p.resolve().relative_to(zoo).as_posix()}"
        except ValueError:
            pass
    return p.name


def _path_models(recipe: Recipe) -> list[str]:
    """Models a data-flow path takes layers from that the merge does not already name."""
    named = {"base", "merged", *(e.model for e in recipe.merge.models)}
    return sorted({s.model for s in recipe.path.steps} - named) if recipe.path else []


def _what_it_is(recipe: Recipe) -> str:
    """The card's first sentence: the merge, and the layer path when the recipe has one."""
    merge = (f"A `{recipe.merge.merge_method}` merge of {len(recipe.merge.models)} models over a common base"
             if not recipe.path or recipe.path.uses_merge else "A stack of layers taken from the parent models")
    if not recipe.path:
        return merge + ", found by evo's evolutionary search."
    steps, n = recipe.path.steps, recipe.path.num_layers
    used = {}
    for s in steps:
        used[s.model] = used.get(s.model, 0) + 1
    scaled = sum(1 for s in steps if s.scale != 1.0)
    return (f"{merge}, run as a data-flow path of **{len(steps)} layers** (the parents have {n}): "
            + ", ".join(f"{k} layers from {m}" for m, k in used.items())
            + (f"; {scaled} of them with their residual update scaled" if scaled else "")
            + ". Found by evo's evolutionary search; `mergekit.yaml` builds it as mergekit `slices`.")


def _card(recipe: Recipe, paths: dict, fitness: dict, cfg: ExperimentConfig) -> str:
    lines = [
        f"# {cfg.name}: evolved merge",
        "",
        _what_it_is(recipe),
        "",
        "## Parent models",
        "",
        f"- base: `{portable_name(paths['base'], cfg)}`",
        *[f"- {e.model}: `{portable_name(paths[e.model], cfg)}`" for e in recipe.merge.models if e.model != "base"],
        *[f"- {m}: `{portable_name(paths[m], cfg)}`" for m in _path_models(recipe)],
        "",
        f"## Fitness (data version `{fitness['data_version']}`, generation {fitness['generation']})",
        "",
        "| objective | goal | value |",
        "|---|---|---|",
        *[f"| {n} | {o['goal']} | {o['value']:.4f} |" for n, o in fitness["objectives"].items()],
    ]
    stream = fitness.get("stream")
    if stream:
        lines += ["", "## Data", "",
                  f"Evaluated and adapted on data version `{stream['version']}` (shard `{stream['shard']}`), "
                  f"after {len(stream['versions'])} version(s) of the stream `{stream['folder']}`:", "",
                  *[f"- `{v}`" for v in stream["versions"]], "",
                  f"Parent release: {stream['parent_release'] or 'none (the first release; the release slot was the base)'}.",
                  f"Release rule: {stream['rule']}"]
        if stream.get("retention_drift"):
            lines += ["", "Retention lost since each older version's anchor (nats of log-perplexity, summed over "
                      "releases; negative: gained):", "",
                      *[f"- `{k.removeprefix('logppl/replay:')}`: {v:+.4f}" for k, v in sorted(stream["retention_drift"].items())]]
    prev = fitness.get("previous_release")
    same = fitness.get("current_release_same_data")
    if same:  # a stream release: the release it replaces, re-measured on this release's data
        lines += ["", f"## Against the release it replaces ({same['name']}), on the same data", "",
                  "| objective | replaced | this |", "|---|---|---|"]
        for n, o in fitness["objectives"].items():
            old = same["objectives"].get(n)
            lines.append(f"| {n} | {'-' if old is None else f'{old:.4f}'} | {o['value']:.4f} |")
    elif prev:
        lines += ["", f"## Against the previous release ({prev['name']}, data `{prev['data_version']}`)", "",
                  "| objective | previous | this |", "|---|---|---|"]
        for n, o in fitness["objectives"].items():
            old = prev["objectives"].get(n, {}).get("value")
            lines.append(f"| {n} | {'-' if old is None else f'{old:.4f}'} | {o['value']:.4f} |")
    rel = fitness.get("release")
    if rel:
        lines += ["", "## How this release was chosen", "",
                  f"Candidates were scored on search blocks drawn afresh each generation; the best recipes and the "
                  f"simple baselines were then re-scored on a selection split the search never saw. Released: "
                  f"**{rel['label']}** ({rel['kind']}): {rel['reason']}.", "",
                  "| split | " + " | ".join(fitness["objectives"]) + " |", "|---|" + "---|" * len(fitness["objectives"])]
        for split, vals in fitness.get("values_by_split", {}).items():
            if vals:
                note = " (adjusted to the first draw; not comparable across splits)" if split == "search" else ""
                lines.append(f"| {split}{note} | " + " | ".join(f"{vals.get(n, float('nan')):.4f}" for n in fitness["objectives"]) + " |")
        margins = {k: m for k, m in (fitness.get("margins") or {}).items() if m}
        if margins:
            lines += ["", "Margin in mean log-perplexity (nats; negative: this release is better), paired over the same "
                      "blocks and stratified by evaluation set (each set's mean difference, averaged over sets as the "
                      "objective is; the spread is within sets only), with a normal 95% interval:", ""]
            splits = []
            for key, m in margins.items():
                what, split = key.split("/")
                splits += [split] if split not in splits else []
                lines.append(f"- {what.replace('_', ' ')} ({rel['best_baseline'] if 'baseline' in what else 'uniform average'}), "
                             f"{split} split: {m['mean']:+.4f} [{m['lo']:+.4f}, {m['hi']:+.4f}] over {m['blocks']} blocks")
            lines += ["", "Which text each interval covers (none covers documents from other sources, periods or "
                      "books than the evaluation sets; a margin there can be smaller):", ""]
            lines += [f"- {split}: {SPLIT_TEXT.get(split, 'blocks of the evaluation sets')}" for split in splits]
    comp = fitness.get("comparison")
    if comp:
        coll = next((c for c in ("test", "selection", "valid") if any(c in v for v in comp.values())), "valid")
        sets = fitness.get("comparison_sets") or list(cfg.eval.sets)
        lines += ["", f"## Comparison (log-perplexity, {coll} split)", "",
                  f"The {coll} split: {SPLIT_TEXT.get(coll, 'blocks of the evaluation sets')}.", "",
                  "| model | " + " | ".join(sets) + " | mean |", "|---" * (len(sets) + 2) + "|"]
        for label, colls in comp.items():
            m = colls.get(coll, {})
            if "error" not in m and m:
                mean = float(np.mean([m[f"logppl/{s}"] for s in sets]))
                lines.append(f"| {label} | " + " | ".join(f"{m[f'logppl/{s}']:.4f}" for s in sets) + f" | {mean:.4f} |")
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


MANIFEST_FOOTER = "# files: "  # last line: how many files, and the sha256 of the sorted list of paths


def _release_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _listing_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


def write_manifest(root: Path) -> None:
    """``sha256  path`` for every file of the release, then a footer line with the number of files
    and the sha256 of their sorted paths, so a manifest that lost lines is recognised as such."""
    files = _release_files(root)
    entries = [f"{_sha256(root / rel)}  {rel}" for rel in files]
    entries.append(f"{MANIFEST_FOOTER}{len(files)} {_listing_digest(files)}")
    atomic_write_text(root / MANIFEST, "\n".join(entries) + "\n")


def verify_manifest(root: str | Path) -> None:
    """Raise EvoError naming the first problem: a manifest without its footer (emptied or
    truncated), a footer that disagrees with the listed files, a listed file missing or altered,
    or a file in the release the manifest does not list.

    This proves the files are the ones the manifest lists, not who wrote them: anyone can re-hash
    an edited release. For provenance, sign MANIFEST.sha256 (e.g. ``gpg --detach-sign`` or
    ``ssh-keygen -Y sign``) and verify that signature before ``evo verify``."""
    root = Path(root)
    check_self_contained(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise EvoError(f"{root}: no {MANIFEST}")
    lines = [ln for ln in manifest.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines or not lines[-1].startswith(MANIFEST_FOOTER):
        raise EvoError(f"{manifest}: incomplete manifest (no '{MANIFEST_FOOTER.strip()}' footer line): "
                       "it was emptied, truncated or written by an older evo")
    count, _, digest = lines[-1][len(MANIFEST_FOOTER):].partition(" ")
    listed = []
    for line in lines[:-1]:
        expected, _, rel = line.partition("  ")
        if not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise EvoError(f"{manifest}: malformed line {line[:80]!r}")
        listed.append((rel, expected))
    paths = [rel for rel, _ in listed]
    if not count.isdigit() or int(count) != len(paths) or digest != _listing_digest(sorted(paths)):
        raise EvoError(f"{manifest}: the file list does not match its footer (lines were removed or added)")
    for rel, expected in listed:
        path = root / rel
        if not path.is_file():
            raise EvoError(f"{path}: listed in {MANIFEST} but missing")
        if _sha256(path) != expected:
            raise EvoError(f"{path}: sha256 does not match {MANIFEST}")
    extra = sorted(set(_release_files(root)) - set(paths))
    if extra:
        raise EvoError(f"{root / extra[0]}: not listed in {MANIFEST} (a file was added to the release)")


def check_self_contained(root: Path) -> None:
    """Refuse a release holding anything but regular files and folders: a symlink (to a file or
    a folder, inside or outside the release), a FIFO, a socket or a device. Hashing follows
    symlinks, so a manifest check alone passed a ``tokenizer.json`` or an ``eval/`` that pointed
    at copies elsewhere: the release shipped would not be the one verified."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise EvoError(f"{path}: a symlink (to {os.readlink(path)}); a release holds regular files only, "
                               "so it verifies what it ships: copy the target in and re-export")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise EvoError(f"{path}: not a regular file or folder; a release holds regular files only")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_depth(root: Path, model) -> None:
    """A data-flow release has as many layers as its recipe's path (it may differ from the base's)."""
    try:
        recipe = yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return  # the manifest already vouched for the files; an older release may have no recipe
    steps = ((recipe.get("path") or {}).get("steps") or []) if isinstance(recipe, dict) else []
    depth = getattr(model.config, "num_hidden_layers", None)
    if steps and depth != len(steps):
        raise EvoError(f"{root / 'config.json'}: num_hidden_layers is {depth}, the recipe's path has {len(steps)} layers")


def verify(release: str | Path, tolerance: float = 1e-3) -> dict[str, float]:
    """Check the manifest, load the model with plain transformers, and re-measure every
    objective on the recorded data. Returns the re-measured values; raises EvoError otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo.core.config import Objective
    from evo.data.stream import data_version, read_texts
    from evo.scoring.fitness import mean_nll, objective_values

    from evo.data.tokens import token_blocks
    root = Path(release)
    if not root.is_dir():
        raise EvoError(f"{root}: release directory not found")
    verify_manifest(root)
    try:
        fitness = json.loads((root / "fitness.json").read_text(encoding="utf-8"))
        ev = fitness["eval"]
        if not isinstance(fitness.get("objectives"), dict) or not isinstance(fitness.get("objective_specs"), list):
            raise KeyError("objectives")
    except FileNotFoundError:
        raise EvoError(f"{root / 'fitness.json'}: missing (the release records its fitness there)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvoError(f"{root / 'fitness.json'}: not valid JSON ({exc})") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise EvoError(f"{root / 'fitness.json'}: missing field {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
        if (root / "adapter" / "adapter_config.json").is_file():  # `--lora adapter`: measured with it applied
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, root / "adapter").eval()
    except Exception as exc:  # any load failure is a broken release
        raise EvoError(f"{root}: model does not load ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    _check_depth(root, model)
    if fitness.get("eval_blocks"):  # a stream release carries the exact blocks it was measured on
        from safetensors.numpy import load_file

        try:
            blocks = load_file(str(root / fitness["eval_blocks"]))
        except Exception as exc:
            raise EvoError(f"{root / fitness['eval_blocks']}: unreadable ({type(exc).__name__})") from None
        metrics = {f"logppl/{name}": mean_nll(model, torch.from_numpy(b), batch_size=ev["batch_size"])
                   for name, b in blocks.items()}
        set_names = list(blocks)
    else:
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
        set_names = list(ev["sets"])
    tasks = ev.get("tasks") or {}
    if tasks:
        from evo.scoring.tasks import load_task

        for name, path in tasks.items():
            path = Path(path) if Path(path).is_absolute() else root / path  # copied into the release
            if not path.is_file():
                raise EvoError(f"{path}: recorded task file is missing")
            task = load_task(path, tokenizer, limit=ev.get("task_limit"))
            metrics[f"task/{name}"] = task.score(model, batch_size=ev["batch_size"])["value"]
    objectives = [Objective(**o) for o in fitness["objective_specs"]]
    values = objective_values(metrics, objectives, set_names, list(tasks))
    for obj, value in zip(objectives, values):
        recorded = fitness["objectives"][obj.name]["value"]
        if not abs(value - recorded) <= tolerance:
            raise EvoError(f"{root}: objective {obj.name} re-measured {value:.6f}, recorded {recorded:.6f} (tolerance {tolerance})")
    return dict(zip([o.name for o in objectives], values))
