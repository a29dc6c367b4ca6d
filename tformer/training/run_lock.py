"""One run per ``run.out_dir``: a lock file holding the owner's pid and host.

Two runs writing one folder overwrite each other's checkpoints and export and interleave
``metrics.jsonl``. The lock is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+
filesystems), so of two runs started at once exactly one gets it; the other stops with a
message naming the owner. A lock whose owner is gone (a run killed with ``kill -9`` leaves
its lock behind) is stale: on the same host a dead pid is detected and the lock taken over,
with a warning. A lock from another host cannot be checked from here; the message says to
delete the file if that run is over.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from tformer.cli_errors import UsageError

LOCK_NAME = "run.lock"


class RunLocked(UsageError):
    """Another live run holds the lock on this out_dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    # A zombie (killed, not yet reaped by its parent) still answers kill(0): it runs no more.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class RunLock:
    """Hold ``out_dir/run.lock`` from :meth:`acquire` to :meth:`release`."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False
        self.took_over: dict | None = None

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # a lock half-written by a killed run: no owner to respect

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released in between: try again
                self._check_stale(owner, me)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as file:
                json.dump(me, file)
            self.held = True
            return self
        raise RunLocked(f"run.out_dir {self.path.parent}: could not take the lock {self.path} (another run keeps "
                        f"taking it)")

    def _check_stale(self, owner: dict, me: dict) -> None:
        """Return when ``owner``'s lock may be taken over, else raise :class:`RunLocked`."""
        pid, host = owner.get("pid"), owner.get("host")
        if isinstance(pid, int) and host == me["host"]:
            if pid == me["pid"]:
                return  # this process's own lock (a trainer that was not closed): reuse it
            if _alive(pid):
                raise RunLocked(f"run.out_dir {self.path.parent} is in use by another run (pid {pid} on {host}, "
                                f"lock {self.path}); wait for it to finish or set a different run.out_dir")
        elif isinstance(pid, int):
            raise RunLocked(f"run.out_dir {self.path.parent} is locked by pid {pid} on host {host!r} ({self.path}); "
                            f"if that run is over, delete the lock file, else set a different run.out_dir")
        self.took_over = owner
        warnings.warn(f"run.out_dir {self.path.parent}: taking over the stale lock of a run that is gone "
                      f"(pid {pid} on {host})", stacklevel=3)

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
