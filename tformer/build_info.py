"""What ``pip install`` compiled: the record ``setup.py`` writes into the package
(``tformer/_build_info.json``), whether its CUDA archs cover a GPU, and whether the extension
was built against the running torch, checked by an import guard whenever ``tformer._C`` is imported.

Kept free of torch imports: ``tformer env`` and the import guard of ``tformer._C`` read it
before anything heavy loads.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

RECORD_PATH = Path(__file__).with_name("_build_info.json")
EXTENSION = "tformer._C"

REBUILD_HINT = ("rebuild it against the installed torch: "
                "'pip install --no-build-isolation --force-reinstall --no-deps .' "
                "(or '-e .' for a checkout; keep TORCH_CUDA_ARCH_LIST as before), "
                "or reinstall the torch it was built with")


def load_record(path: Path | None = None) -> dict | None:
    """The build record, or None when the package was installed without one (a plain checkout)."""
    path = RECORD_PATH if path is None else Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def torch_mismatch(record: dict | None, running_torch: str) -> str | None:
    """Why tformer._C cannot load with ``running_torch``, or None when it was built for it.

    A C++ extension links against torch's C++ symbols, which change between releases: loading it
    into another torch ends in ``undefined symbol: _ZN3c10...``. Say so before the loader does.
    """
    if not record or not record.get("cuda_extension") or not record.get("torch"):
        return None
    if record["torch"] == running_torch:
        return None
    return (f"tformer._C was built against torch {record['torch']} but torch {running_torch} is installed; "
            f"a C++ extension only loads into the torch it was compiled with. {REBUILD_HINT}")


def parse_arch(arch: str) -> tuple[int, int, bool]:
    """``"9.0"`` -> (9, 0, False); ``"8.6+PTX"`` -> (8, 6, True). Arch-specific suffixes
    (``"9.0a"``) keep their number."""
    ptx = arch.endswith("+PTX")
    number = arch.removesuffix("+PTX").rstrip("af")
    major, minor = number.split(".")
    return int(major), int(minor), ptx


def arch_covers(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch_list`` runs on a GPU of compute ``capability``.

    SASS for sm_XY runs on the same major version at minor >= Y (sm_80 code runs on sm_86);
    PTX is JIT-compiled by the driver for any newer GPU.
    """
    for arch in arch_list:
        major, minor, ptx = parse_arch(arch)
        if (major, minor) == capability or (major == capability[0] and minor <= capability[1]):
            return True
        if ptx and (major, minor) <= capability:
            return True
    return False


class ExtensionMismatch(ImportError):
    """tformer._C was built against another torch than the one running."""


class ExtensionGuard(importlib.abc.MetaPathFinder):
    """A meta-path finder that answers only for ``tformer._C``, and only to refuse it.

    Without it, loading an extension built for another torch fails inside the dynamic loader with
    ``undefined symbol: _ZN3c10...`` (FlashAttention #1644, #1783), which says nothing about the
    cause or the cure. On a match the normal finders import it.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != EXTENSION:
            return None
        # The extension needs torch's libraries loaded first (it links against them).
        import torch

        reason = torch_mismatch(load_record(), torch.__version__)
        if reason is not None:
            raise ExtensionMismatch(reason, name=fullname)
        return None  # fall through to the normal finders


def install_extension_guard() -> None:
    """Put :class:`ExtensionGuard` first on ``sys.meta_path`` (once; ``import tformer`` does it)."""
    if not any(isinstance(finder, ExtensionGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, ExtensionGuard())
