"""One run directory, one driver: an advisory lock held for as long as a driver (or an export)
works in it.

The lock is ``flock`` on ``RUN_DIR/driver.lock`` (``fcntl``, not a lock file whose existence
is the lock): the kernel releases it when the holder's process ends, however it ends, so a
driver killed with SIGKILL leaves no stale lock to clean up by hand. The file records who holds
it (PID, host, command, start time) so a refused second driver can say which one is live.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from evo.core.errors import EvoError

LOCK_NAME = "driver.lock"


class RunLock:
    """``with RunLock(run_dir, "resume"):`` — refused in one line while another process holds it."""

    def __init__(self, root: str | Path, purpose: str):
        self.path = Path(root) / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # 0o666 & ~umask, as any new file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise EvoError(f"{self.path.parent}: in use by {holder}; wait for it to finish or stop it "
                           f"(a second driver would interleave its writes)") from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                  "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an idle run's lock file names nobody
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote (a holder that has not written yet: unknown)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        data = {}
    if not data.get("pid"):
        return "another evo process (it has not recorded its PID yet)"
    what = {"run": "evo driver", "resume": "evo driver", "export": "evo export"}.get(data.get("purpose"), "evo")
    return f"{what} PID {data['pid']} on host {data.get('host', '?')} (since {data.get('since', '?')})"


def holder(root: str | Path) -> str | None:
    """The live holder of a run directory's lock as text, or None when none holds it (for
    ``evo status``)."""
    path = Path(root) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
