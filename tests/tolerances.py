"""One table of tolerances, keyed by dtype, for comparing a backend with the float64 reference.

The values bound the error of computing in that dtype (inputs and outputs rounded to it,
float32 accumulation) against exact float64 math; gradients get the looser "grad" row
because they chain more rounded operations.
"""

import torch

TOLERANCES = {
    # (kind, dtype): dict(atol=..., rtol=...)
    ("forward", torch.float64): dict(atol=1e-10, rtol=1e-10),
    ("forward", torch.float32): dict(atol=1e-5, rtol=1e-5),
    ("forward", torch.float16): dict(atol=2e-3, rtol=2e-3),
    ("forward", torch.bfloat16): dict(atol=1.6e-2, rtol=1.6e-2),
    ("grad", torch.float64): dict(atol=1e-9, rtol=1e-9),
    ("grad", torch.float32): dict(atol=1e-4, rtol=1e-4),
    ("grad", torch.float16): dict(atol=1e-2, rtol=1e-2),
    ("grad", torch.bfloat16): dict(atol=6e-2, rtol=6e-2),
}


def tolerance(dtype: torch.dtype, kind: str = "forward", scale: float = 1.0) -> dict:
    """atol/rtol for ``dtype``; ``scale`` widens atol for outputs whose magnitude is larger than O(1)."""
    tol = TOLERANCES[(kind, dtype)]
    return dict(atol=tol["atol"] * scale, rtol=tol["rtol"])


def assert_close_to_reference(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype,
                              kind: str = "forward", scale: float = 1.0, what: str = "") -> None:
    """Compare a backend's result in ``dtype`` with the float64 reference."""
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    torch.testing.assert_close(actual.double(), expected64.double(), **tolerance(dtype, kind, scale),
                               msg=lambda m: f"{what} ({dtype}, {kind}): {m}")
