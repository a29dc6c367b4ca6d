"""Checks, when ``tformer._C`` is imported, that it was built against the running torch.

Without this, loading an extension built for another torch fails inside the dynamic loader
with ``undefined symbol: _ZN3c10...`` (FlashAttention #1644, #1783), which says nothing about
the cause or the cure. The finder only speaks up on a mismatch; otherwise the normal import runs.
"""

from __future__ import annotations

import importlib.abc
import sys

EXTENSION = "tformer._C"


class ExtensionMismatch(ImportError):
    """tformer._C was built against another torch than the one running."""


class ExtensionGuard(importlib.abc.MetaPathFinder):
    """A meta-path finder that answers only for ``tformer._C``, and only to refuse it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != EXTENSION:
            return None
        # The extension needs torch's libraries loaded first (it links against them).
        import torch

        from tformer.build_info import load_record, torch_mismatch

        reason = torch_mismatch(load_record(), torch.__version__)
        if reason is not None:
            raise ExtensionMismatch(reason, name=fullname)
        return None  # fall through to the normal finders


def install() -> None:
    if not any(isinstance(finder, ExtensionGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, ExtensionGuard())
