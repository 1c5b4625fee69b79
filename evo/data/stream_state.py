"""The shard stream's saved state, as typed records: which shards it consumed and what it
remembers to de-duplicate against.

The JSON is format 1, the one every saved stream has written (field order included), so a
resumed stream reads the state files of earlier runs. Token blocks are not saved: a resumed
stream rebuilds them from the shards, filtered to the documents each kept (``kept``).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evo.core.errors import EvoError
from evo.core.fs import atomic_write_text

STATE_FORMAT = 1


@dataclass(frozen=True)
class ShardRecord:
    """One consumed shard: its size and hash when consumed, the version it made (None when
    ``skipped`` says why it made none) and the content keys of the documents it kept."""

    name: str
    size: int
    sha256: str
    version: str | None = None
    skipped: str | None = None
    kept: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "version": self.version,
                "skipped": self.skipped, "kept": list(self.kept)}

    @classmethod
    def from_dict(cls, data: dict) -> "ShardRecord":
        return cls(name=str(data["name"]), size=int(data["size"]), sha256=str(data["sha256"]),
                   version=data["version"], skipped=data.get("skipped"), kept=tuple(data["kept"]))


@dataclass(frozen=True)
class StreamState:
    """A stream's settings, consumed shards (in consumption order), the exact keys it has seen
    and the MinHash signatures (uint32 values) of the documents it kept."""

    folder: str
    settings: dict
    shards: tuple[ShardRecord, ...] = ()
    seen: tuple[str, ...] = ()
    signatures: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: signatures as base64 of little-endian uint32, keys seen sorted."""
        return {
            "format": STATE_FORMAT,
            "folder": self.folder,
            "settings": dict(self.settings),
            "shards": [s.to_dict() for s in self.shards],
            "seen": sorted(self.seen),
            "signatures": {k: base64.b64encode(np.asarray(v).astype("<u4").tobytes()).decode()
                           for k, v in self.signatures.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "StreamState":
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or "settings" not in data:
            raise EvoError(f"stream state: unknown format (expected format {STATE_FORMAT})")
        try:
            return cls(
                folder=str(data["folder"]),
                settings=dict(data["settings"]),
                shards=tuple(ShardRecord.from_dict(s) for s in data["shards"]),
                seen=tuple(data["seen"]),
                signatures={k: np.frombuffer(base64.b64decode(b64), dtype="<u4")
                            for k, b64 in data["signatures"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise EvoError(f"stream state: malformed ({type(err).__name__}: {err})") from None

    @classmethod
    def read(cls, path: Path) -> "StreamState":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise EvoError(f"{path}: unreadable stream state ({type(err).__name__})") from None
        return cls.from_dict(data)

    def write(self, path: Path) -> None:
        """Atomically: a stream stopped mid-write resumes from the previous state."""
        atomic_write_text(Path(path), json.dumps(self.to_dict()))
