"""Evaluation and training text: reading local files and naming the data version.

A data version is a content hash of the text and of how it is cut into tokens, so fitness
measured on different data is never confused (the fitness cache is keyed by it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from evo.errors import EvoError


def read_texts(path: str | Path) -> list[str]:
    """Documents of a ``.jsonl`` file (one ``{"text": ...}`` per line) or a plain text file."""
    path = Path(path)
    if not path.is_file():
        raise EvoError(f"{path}: file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvoError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvoError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EvoError(f"{path}:{lineno}: line has no string field 'text'")
        docs.append(record["text"])
    return docs


def data_version(paths: Iterable[str | Path], **settings) -> str:
    """``d-`` + a short hash of the files' bytes and of the tokenisation settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in sorted(map(str, paths)):
        h.update(Path(p).name.encode())
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return "d-" + h.hexdigest()[:12]
