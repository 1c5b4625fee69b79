"""fitness.json: what a release measured, on which data, how it was chosen and where it came
from. One typed record, built by :func:`fitness_record` for a fixed-data run's release (from the
selection stage, :func:`selection_fitness`) and for a stream version's (by the loop), and made
portable as the release ships (:func:`shipped_fitness`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import yaml

from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.core.fs import atomic_write_text
from evo.zoo.gguf import file_sha256
from evo.artifacts.checkpoint import Checkpoint
from evo.artifacts.portable import portable_name
from evo.artifacts.store import RunStore

EVAL_BLOCKS = "eval/blocks.safetensors"  # in a subfolder: loaders take every top-level *.safetensors as weights
TASKS_DIR = "eval/tasks"  # the task files a release was scored on, copied in (evo verify re-scores them)


@dataclass(frozen=True, kw_only=True)
class FitnessRecord:
    """fitness.json, its keys in field order. Fields with a default belong to one kind of
    release (or are added as it is written) and are left out of the JSON when None."""

    objectives: dict[str, dict]  # name -> {value, goal}: what `evo verify` re-measures
    # a fixed-data run's release: the split measured on, every split's values, the choice, the margins
    measured_on: str | None = None
    values_by_split: dict | None = None
    release: dict | None = None
    margins: dict | None = None
    data_version: str
    generation: int
    run: str
    eval: dict  # how it was evaluated (eval_record)
    objective_specs: list[dict]
    data_inputs: dict | None = None  # a fixed-data run's: what its data version was computed from
    # a stream version's release: the stream, the release it replaces on the same data, the sets
    stream: dict | None = None
    current_release_same_data: dict | None = None
    comparison_sets: list[str] | None = None
    comparison: dict
    lineage: list[dict]
    eval_blocks: str | None = None  # the exact blocks measured on, inside the release
    previous_release: dict | None = None  # the run's release before this one: name, objectives, data version

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None or f.default is MISSING}


def fitness_record(cfg: ExperimentConfig, store: RunStore, specs: list[dict], values, *, data_version: str,
                   generation: int, comparison: dict, lineage_of: str | None, eval_sets: bool = True,
                   **kind) -> FitnessRecord:
    """The record of a release with objective ``values`` (in the order of ``specs``), measured on
    ``data_version``: the objectives with their goals, the run, how it was evaluated (without
    the sets when ``eval_sets`` is false: a stream's blocks are shipped in the release instead),
    and the lineage of candidate ``lineage_of`` (none for a baseline). ``kind``: the fields of a
    fixed-data or a stream release."""
    return FitnessRecord(
        objectives={o["name"]: {"value": v, "goal": o["goal"]} for o, v in zip(specs, values)},
        data_version=data_version, generation=generation, run=str(store.root.resolve()),
        eval=eval_record(cfg, sets=eval_sets), objective_specs=specs, comparison=comparison,
        lineage=[] if lineage_of is None else lineage_record(store, lineage_of), **kind)


def selection_fitness(cfg: ExperimentConfig, ckpt: Checkpoint, store: RunStore, label: str | None = None) -> FitnessRecord:
    """The record of a fixed-data run's release (or of ``label``, another row of the selection
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
    # an evolved release's candidate is named in its label: "evolved #1 (g0001-c003)"
    best_id = label.rsplit("(", 1)[-1].rstrip(")") if kind == "evolved" else None
    return fitness_record(
        cfg, store, objectives, values, data_version=ckpt.data_version, generation=ckpt.generation,
        comparison=sel["table"], lineage_of=best_id,
        measured_on=split,
        values_by_split={k: row[k] if k == "search" else row[k].get("objectives")
                         for k in ("search", "selection", "test") if k in row},
        release={"label": label, "kind": kind, "reason": reason,
                 "best_baseline": sel.get("best_baseline"), "best_lambda": sel.get("best_lambda")},
        margins=margins, data_inputs=ckpt.data_inputs)


def lineage_record(store: RunStore, candidate: str | None) -> list[dict]:
    """fitness.json's lineage: ``candidate`` and its ancestors, from the run's candidate records."""
    from evo.artifacts.report import lineage  # here: the report loads matplotlib and sets its backend

    return [{"candidate": c["candidate"], "generation": c["generation"], "parents": c.get("parents") or [],
             "values": c.get("values")} for c in lineage(store.candidates(), candidate)]


def eval_record(cfg: ExperimentConfig, sets: bool = True) -> dict:
    """fitness.json's account of how the release was evaluated (what `evo verify` redoes)."""
    return {
        "sets": {k: str(Path(v).resolve()) for k, v in cfg.eval.sets.items()} if sets else {},
        "tasks": {k: str(Path(v).resolve()) for k, v in cfg.eval.tasks.items()},
        "task_limit": cfg.eval.task_limit, "task_subset": cfg.eval.task_subset,
        "seq_len": cfg.eval.seq_len, "max_blocks": cfg.eval.max_blocks, "batch_size": cfg.eval.batch_size,
    }


def shipped_fitness(fitness: FitnessRecord, cfg: ExperimentConfig, store: RunStore, staging: Path) -> FitnessRecord:
    """The record as shipped: what the release was evaluated on named by relative name and
    sha256, never by the builder's absolute paths (which leak a machine's layout and mean nothing
    elsewhere). Task files are copied into ``eval/tasks/`` of ``staging`` so ``evo verify``
    re-scores them from the release alone; evaluation text is in ``eval/blocks.safetensors``."""
    record = json.loads(json.dumps(fitness.to_dict(), default=str))  # a deep copy, plain JSON types
    record["run"] = store.root.name
    ev = record.get("eval") or {}
    if ev.get("sets"):
        ev["sets_sha256"] = {n: file_sha256(Path(p)) for n, p in ev["sets"].items() if Path(p).is_file()}
    if ev.get("tasks"):
        ev["tasks_sha256"] = {}
        for name, path in list(ev["tasks"].items()):
            ev["tasks"][name] = _copy_task(Path(path), name, staging)
            ev["tasks_sha256"][name] = file_sha256(staging / ev["tasks"][name])
    inputs = record.get("data_inputs") or {}
    if inputs.get("files"):
        inputs["sha256"] = [file_sha256(Path(p)) if Path(p).is_file() else None for p in inputs["files"]]

    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
            return portable_name(value, cfg)
        return value

    return FitnessRecord(**portable(record))


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
