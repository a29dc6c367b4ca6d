"""The correctness gate every benchmark passes before it is timed: its result against the
float64 reference, with the tolerance table the tests use (tests/tolerances.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_TOLERANCES_FILE = Path(__file__).resolve().parent.parent / "tests" / "tolerances.py"


def _load_tolerances():
    # tests/ is not a package; load its one tolerance table by path rather than keep a copy.
    spec = importlib.util.spec_from_file_location("tformer_test_tolerances", _TOLERANCES_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tolerances = _load_tolerances()


def check_against_reference(results: dict[str, torch.Tensor], expected64: dict[str, torch.Tensor],
                            dtype: torch.dtype, kind: str, what: str) -> float:
    """Assert each result is close to its float64 expectation; return the largest absolute error.

    ``kind`` is "forward" or "grad" (the tolerance row). atol is widened by the magnitude of
    the expectation, since e.g. a LayerNorm weight gradient sums over every row.
    """
    worst = 0.0
    for name, expected in expected64.items():
        actual = results[name]
        assert actual is not None, f"{what}: no {name} was computed"
        scale = max(1.0, float(expected.abs().max()))
        _tolerances.assert_close_to_reference(actual, expected, dtype, kind=kind, scale=scale,
                                              what=f"{what}: {name}")
        worst = max(worst, float((actual.detach().double() - expected).abs().max()))
    return worst
