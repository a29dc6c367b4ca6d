"""Where the self-check's verdicts live, what they are keyed by, and how they are written safely.

A verdict is one JSON file per key in the user's cache folder (platformdirs' ``user_cache_dir``,
``~/.cache/tformer`` on Linux, following ``XDG_CACHE_HOME``). The key holds what can change a
kernel's answer or speed: the device's name, the driver, torch, Triton, and a hash of tformer's
kernel sources and compiled extension. Change any and the old verdict is simply not found.

Writers take an exclusive ``flock`` on the key's lock file and publish with ``os.replace`` of a
finished temporary file: readers see a whole verdict or none, and a check that dies midway
leaves only its temporary file, never a half-written verdict.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

FORMAT = 1


def cache_dir() -> Path:
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("tformer", appauthor=False))
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "tformer"


def build_hash() -> str:
    """A hash of what was built: the Triton kernel sources, the backends' Python and the compiled
    extension (a rebuilt or edited kernel must be checked again)."""
    import tformer
    import tformer.kernels  # its __init__ imports no Triton; its __path__ says where the kernels are

    package = Path(tformer.__file__).parent
    kernels = [path for folder in tformer.kernels.__path__ for path in sorted(Path(folder).glob("*.py"))]
    digest = hashlib.sha256()
    files = [*kernels, *sorted((package / "backends").rglob("*.py")), *sorted(package.glob("_C*.so"))]
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _driver_version() -> str | None:
    try:
        version = torch._C._cuda_getDriverVersion()  # e.g. 12080 for CUDA 12.8's driver API
    except (AttributeError, RuntimeError):
        return None
    return str(version)


def device_key(device: torch.device) -> dict:
    """What a verdict is valid for."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        driver = _driver_version()
    else:
        import platform

        processor = platform.processor()
        name, capability, driver = f"CPU {platform.machine()}" + (f" ({processor})" if processor else ""), None, None
    return {"format": FORMAT, "device": name, "capability": capability, "driver": driver,
            "torch": torch.__version__, "triton": triton_version, "build": build_hash()}


def key_file(key: dict, directory: Path | None = None) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"selftest-{name}.json"


def read(path: Path, key: dict) -> dict | None:
    """The verdict at ``path`` if it is whole and for ``key``; None otherwise."""
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and verdict.get("key") == key else None


def write(path: Path, verdict: dict) -> None:
    """Publish ``verdict`` at ``path`` atomically (a finished temporary file, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(verdict, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of verdict ``path`` (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
