"""One run per ``run.out_dir``: ``run.lock``, an exclusive ``flock`` plus the owner's pid and host.

Two runs writing one folder overwrite each other's checkpoints and export and interleave
``metrics.jsonl``. The kernel holds the lock (``fcntl.flock``) for as long as the owning
process lives, so of two runs started at once exactly one gets it, and the other stops with a
message naming the owner (pid and host, read from the file). A run killed with ``kill -9``
cannot remove its lock file, but the kernel drops its ``flock`` with the process: the next run
finds a file that names an owner yet is not locked, reports the stale lock of that pid and
takes it over. (Checking a pid instead would mistake a recycled pid for a live run.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from tformer.schema import UsageError

LOCK_NAME = "run.lock"

# Locks this process holds, by path: a second Trainer on the same out_dir in one process (a
# first one that was never closed) takes the lock over instead of refusing itself.
_HELD: dict[str, "RunLock"] = {}


class RunLocked(UsageError):
    """Another live run holds the lock on this out_dir."""


def _read_owner(fd: int) -> dict | None:
    """The owner record in the open lock file: None when empty, {} when unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        owner = json.loads(raw)
    except ValueError:
        return {}  # half-written by a run killed while taking the lock
    return owner if isinstance(owner, dict) else {}


class RunLock:
    """Hold ``out_dir/run.lock`` from :meth:`acquire` to :meth:`release` (or process exit)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:
            _HELD[key].release()
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd) or {}
                os.close(fd)
                raise RunLocked(f"run.out_dir {self.path.parent} is in use by another run (pid {owner.get('pid', '?')} "
                                f"on {owner.get('host', '?')}, lock {self.path}); wait for it to finish or set a "
                                f"different run.out_dir") from None
            # The holder before us may have removed the file after we opened it: then we hold a
            # lock on a deleted file, and must lock the path's current file instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_owner(fd)
            if previous is not None:
                self.took_over = previous
                warnings.warn(f"run.out_dir {self.path.parent}: taking over the stale lock of a run that is gone "
                              f"(pid {previous.get('pid', '?')} on {previous.get('host', '?')}); it was killed "
                              f"or crashed", stacklevel=2)
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
            self.fd = fd
            _HELD[key] = self
            return self
        raise RunLocked(f"run.out_dir {self.path.parent}: could not take the lock {self.path} (it keeps changing)")

    def release(self) -> None:
        if self.fd is None:
            return
        # Remove the file while still holding the lock (a run that opened it meanwhile sees the
        # inode change and retries), then let go.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        _HELD.pop(str(self.path.resolve()), None)
