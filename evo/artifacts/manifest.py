"""A release's MANIFEST.sha256: the sha256 of every file, and a footer that makes a manifest with
lines removed recognisable. Written last when a release is built; checked first by ``evo verify``.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from evo.core.errors import EvoError
from evo.core.fs import atomic_write_text
from evo.zoo.gguf import file_sha256

MANIFEST = "MANIFEST.sha256"
MANIFEST_FOOTER = "# files: "  # last line: how many files, and the sha256 of the sorted list of paths


def _release_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _listing_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


def write_manifest(root: Path) -> None:
    """``sha256  path`` for every file of the release, then a footer line with the number of files
    and the sha256 of their sorted paths, so a manifest that lost lines is recognised as such."""
    files = _release_files(root)
    entries = [f"{file_sha256(root / rel)}  {rel}" for rel in files]
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
        if file_sha256(path) != expected:
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
