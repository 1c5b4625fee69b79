"""Documents as text: read from local files, cleaned, keyed by content, and versioned.

A data version is a content hash of the text and of how it is cut into tokens, so fitness
measured on different data is never confused (the fitness cache is keyed by it).
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable

from evo.core.errors import EvoError
from evo.core.fs import read_records


def read_texts(path: str | Path) -> list[str]:
    """Documents of a ``.jsonl`` file (one ``{"text": ...}`` per line) or a plain text file."""
    path = Path(path)
    if not path.is_file():
        raise EvoError(f"{path}: file not found")
    if path.suffix != ".jsonl":
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise EvoError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        return [raw] if raw.strip() else []
    docs = []
    for lineno, record in read_records(path):
        if not isinstance(record.get("text"), str):
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


# C0/C1 control characters except tab and newline (which carry layout in code and prose).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_INNER_SPACE = re.compile(r"(?<=\S)[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]{2,}")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_document(text: str) -> str:
    """NFC-normalise and tidy one document.

    Rules: ``\\r\\n``/``\\r`` become ``\\n``; control characters other than tab and newline are
    dropped; runs of spaces *inside* a line collapse to one space (leading indentation is kept,
    since it is syntax in code); trailing spaces and leading or trailing blank lines go; three or more newlines become two.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(_INNER_SPACE.sub(" ", line).rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def canonical(text: str) -> str:
    """Whitespace-insensitive form of a document: the content that keys and splits compare."""
    return " ".join(text.split())


def content_key(text: str) -> str:
    """Exact-duplicate key of a document (128-bit BLAKE2b of its canonical form, hex): copies
    that differ only in whitespace or line breaks are duplicates."""
    return hashlib.blake2b(canonical(text).encode("utf-8"), digest_size=16).hexdigest()
