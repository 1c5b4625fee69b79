"""Files as evo writes and reads them: atomic writes, staged folders renamed into place, modes
that follow the umask, and YAML/JSONL readers that fail in one line naming the file (and line).

Every layer writes run files, merged models, adapters and releases; these helpers are the one
way it is done, so "nothing is lost or half-written" holds in one place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from evo.core.errors import EvoError


def umask_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file or folder under the current umask.

    ``mkstemp``/``mkdtemp`` create 0600/0700 whatever the umask; what evo renames into place
    (releases, merged models, run files) is meant to be shared like any other output, so it
    gets this mode before the rename."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def umask_tree(root: Path) -> None:
    """Give a staged folder (and all in it) the modes the umask gives new files and folders,
    before it is renamed into place: files copied from elsewhere keep their source's mode and
    some writers create 0600 files, but what evo ships follows the user's umask."""
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``: a reader
    sees the old file or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(out: Path, *, replace: bool = False, create: bool = True) -> Iterator[Path]:
    """A sibling temp folder to write a whole directory into; renamed to ``out`` when the block
    ends without an error, removed when it raises.

    The staged folder gets the umask's modes before the rename. With ``replace`` an existing
    ``out`` is first renamed aside and deleted after the swap, so a reader finds the old tree or
    the new one; without it the rename fails on an existing non-empty ``out`` (the caller
    decides what may be replaced). With ``create=False`` the staged path is yielded before it
    exists, for writers that make their output folder themselves."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    if create:
        tmp.mkdir()
    try:
        yield tmp
        umask_tree(tmp)
        if replace and out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_yaml(path: str | Path, what: str):
    """A user's YAML file, or a one-line EvoError naming it (missing, unreadable, bad syntax)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EvoError(f"{path}: cannot read: {what} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvoError(f"{path}: cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise EvoError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a user's JSONL file; an unreadable or
    non-UTF-8 file, a malformed line or one that is not a JSON object is a one-line EvoError
    naming the file (and ``file:line``)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise EvoError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise EvoError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvoError(f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno})") from None
        if not isinstance(doc, dict):
            raise EvoError(f"{path}:{number}: a record must be a JSON object, got {type(doc).__name__}")
        yield number, doc


def read_jsonl(path: Path) -> Iterator[dict]:
    """Records of one of evo's own append-only logs; a torn final line (a driver killed
    mid-write) is skipped, and a missing file has none."""
    if not Path(path).exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
