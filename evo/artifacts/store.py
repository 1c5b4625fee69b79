"""The run directory: config, per-generation checkpoints, fitness cache and event log.

Layout::

    RUN_DIR/config.yaml        the resolved experiment config (what `evo resume` reruns)
    RUN_DIR/checkpoint.json    optimizer + RNG state, logbook, hall of fame, after the last
                               complete generation (written to a temp file, then renamed)
    RUN_DIR/candidates.jsonl   one line per evaluated candidate (recipe, values, status, timings)
    RUN_DIR/cache.jsonl        results by ``recipe key|data version[|b<draw>]`` (the draw: the
                               generation's search blocks, ``evo.data.draws``): a recipe is never
                               evaluated twice on the same blocks, also across a resume
    RUN_DIR/events.jsonl       run started/resumed, generation done, failures, export
    RUN_DIR/search_log.jsonl   asynchronous runs: every ask and tell in the order they happened
    RUN_DIR/releases/vNNNN/    exported releases

Appends are line-buffered JSON with a flush per record, so a killed driver loses at most the
line it was writing; a torn last line is ignored on reading.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from evo.artifacts.checkpoint import Checkpoint
from evo.core.errors import EvoError
from evo.core.records import CandidateRecord
from evo.core.fs import atomic_write_text, read_jsonl, read_yaml


class RunStore:
    """Reads and writes one run directory. All writes are atomic or append-only."""

    CONFIG = "config.yaml"
    APPLIED = "config.applied.yaml"  # the config the run's state was made with (resume compares)
    SEARCH_LOG = "search_log.jsonl"
    CHECKPOINT = "checkpoint.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.created = False  # whether ``create`` made the folder (not just filled an empty one)
        self._recorded: set | None = None  # candidates already in candidates.jsonl (loaded on first record)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, root: str | Path, config: dict) -> "RunStore":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise EvoError(f"{root}: --run-dir names an existing file, not a directory")
        if root.exists() and any(root.iterdir()):
            raise EvoError(f"{root}: run directory exists and is not empty (use `evo resume {root}`)")
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        store.created = created
        text = yaml.safe_dump(config, sort_keys=False)
        atomic_write_text(root / cls.APPLIED, text)
        atomic_write_text(root / cls.CONFIG, text)
        return store

    @classmethod
    def open(cls, root: str | Path) -> "RunStore":
        root = Path(root)
        if not (root / cls.CONFIG).is_file():
            raise EvoError(f"{root}: not a run directory (no {cls.CONFIG})")
        return cls(root)

    def discard_if_unstarted(self) -> bool:
        """Remove a run directory whose start failed before any work (no checkpoint, nothing in
        the fitness cache): everything in it was written by this start (``create`` wants an empty
        or new folder). Returns whether it was removed."""
        if (self.root / self.CHECKPOINT).exists() or any(True for _ in read_jsonl(self.root / "cache.jsonl")):
            return False
        if self.created:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            for child in self.root.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        return True

    def config(self) -> dict:
        data = read_yaml(self.root / self.CONFIG, "run config")
        if not isinstance(data, dict):
            raise EvoError(f"{self.root / self.CONFIG}: not a YAML mapping")
        return data

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        atomic_write_text(self.root / self.CHECKPOINT, json.dumps(ckpt.to_dict(), default=_default))

    def load_checkpoint(self) -> Checkpoint | None:
        path = self.root / self.CHECKPOINT
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EvoError(f"{path}: checkpoint is not valid JSON ({exc})") from None
        return Checkpoint.from_dict(data, where=str(path))

    # ------------------------------------------------------------------ logs
    def _append(self, name: str, record: dict) -> None:
        line = (json.dumps(record, default=_default) + "\n").encode()
        with open(self.root / name, "ab+") as fh:
            # a killed driver may have left a torn last line: end it, so this record is not glued to it
            if fh.seek(0, os.SEEK_END) and (fh.seek(-1, os.SEEK_END), fh.read(1))[1] != b"\n":
                line = b"\n" + line
            fh.write(line)
            fh.flush()

    def event(self, kind: str, **data: Any) -> None:
        self._append("events.jsonl", {"time": time.time(), "event": kind, **data})

    def events(self) -> list[dict]:
        return list(read_jsonl(self.root / "events.jsonl"))

    def record_candidate(self, record: CandidateRecord | dict) -> None:
        """Append a candidate's record once: a resumed driver that re-tells a candidate already
        recorded before the kill (its generation was not checkpointed) writes no second line."""
        if isinstance(record, CandidateRecord):
            record = record.to_dict()
        if self._recorded is None:
            self._recorded = {_candidate_id(r) for r in self.candidates()}
        ident = _candidate_id(record)
        if ident in self._recorded:
            return
        self._recorded.add(ident)
        self._append("candidates.jsonl", record)

    def candidates(self) -> list[dict]:
        """Every candidate record, one per candidate (runs written before records were kept
        unique may hold a repeat after a resume: the first stands)."""
        seen, out = set(), []
        for rec in read_jsonl(self.root / "candidates.jsonl"):
            ident = _candidate_id(rec)
            if ident not in seen:
                seen.add(ident)
                out.append(rec)
        return out

    def first_failure(self) -> str:
        """The first failed candidate's id and error (for a run in which none succeeded)."""
        for rec in self.candidates():
            if rec.get("status") == "failed":
                return f"{rec.get('candidate')}: {rec.get('error')}"
        return "no candidate was evaluated"

    def log_step(self, record: dict) -> None:
        """One step of an asynchronous search (an ask, a tell, an elite re-score), in the order
        it happened: ``evo resume`` replays them from the last checkpoint (``evo.loop.steady_state``)."""
        self._append(self.SEARCH_LOG, record)

    def search_log(self) -> list[dict]:
        return list(read_jsonl(self.root / self.SEARCH_LOG))

    # ------------------------------------------------------------------ fitness cache
    def cache_put(self, key: str, result: dict) -> None:
        self._append("cache.jsonl", {"key": key, "result": result})

    def cache_load(self) -> dict[str, dict]:
        return {r["key"]: r["result"] for r in read_jsonl(self.root / "cache.jsonl")}

    @property
    def releases_dir(self) -> Path:
        return self.root / "releases"


def _candidate_id(record: dict) -> tuple:
    """What makes a candidate record one candidate: its id, generation and the result it was
    told (cache key: recipe, data version, block draw). An elite re-scored on a later draw is a
    new record; the same telling repeated by a resume is not."""
    return record.get("candidate"), record.get("generation"), record.get("key")


def _default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
