"""Environment variables that override a choice the registry makes: the one place that reads them.

Kernels and backends take every choice as an argument; this module turns the environment into
those arguments, at call time (so a variable set after ``import tformer`` counts). An explicit
argument (``backend="triton:atomic_dq"``) wins over a variable. ``tformer env`` lists what is set.

- ``TFORMER_BACKEND``: the default backend (``"auto"`` when unset).
- ``TFORMER_ATTENTION_FWD``: ``auto`` | ``hopper`` | ``fa2``, the Triton attention forward path.
- ``TFORMER_ATTENTION_DQ``: ``split`` | ``atomic``, the Triton attention backward's dQ.
- ``TFORMER_AUTOTUNE``: ``0`` runs each Triton kernel's leading configuration untimed.
- ``TFORMER_SELFTEST``: ``0`` turns the per-device self-check off (``auto`` then trusts the
  shipped table, else picks ``torch``).
- ``TRITON_INTERPRET``: ``1`` runs Triton kernels on CPU tensors (Triton's own variable).
- ``TFORMER_ATTENTION_FORCE_SM80``: ``1`` keeps the CUDA attention on its sm_80 kernels, both
  passes (as ``backend="cuda:sm80"``); ``TFORMER_ATTENTION_BWD_FORCE_SM80``: ``1``, the backward
  alone; ``TFORMER_ATTENTION_BAND_FORCE_SM80``: ``1``, only the calls with a sliding window,
  bottom-right alignment or a soft-cap (the sm_90a kernels' banded variants).
"""

from __future__ import annotations

import os

FWD_PATHS = ("auto", "hopper", "fa2")
DQ_MODES = ("split", "atomic")
VARIABLES = ("TFORMER_BACKEND", "TFORMER_ATTENTION_FWD", "TFORMER_ATTENTION_DQ", "TFORMER_AUTOTUNE",
             "TFORMER_SELFTEST", "TRITON_INTERPRET", "TFORMER_ATTENTION_FORCE_SM80",
             "TFORMER_ATTENTION_BWD_FORCE_SM80", "TFORMER_ATTENTION_BAND_FORCE_SM80")


def _choice(variable: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(variable, "") or default
    if value not in choices:
        raise ValueError(f"environment variable {variable} is {value!r}; expected one of {', '.join(choices)}")
    return value


def _flag(variable: str, default: bool) -> bool:
    value = os.environ.get(variable, "")
    return default if value == "" else value != "0"


def default_backend() -> str:
    return os.environ.get("TFORMER_BACKEND", "") or "auto"


def attention_fwd_path() -> str:
    return _choice("TFORMER_ATTENTION_FWD", "auto", FWD_PATHS)


def attention_dq_mode() -> str:
    return _choice("TFORMER_ATTENTION_DQ", "split", DQ_MODES)


def autotune() -> bool:
    return _flag("TFORMER_AUTOTUNE", True)


def selftest() -> bool:
    return _flag("TFORMER_SELFTEST", True)


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET", False)


def kernel_options(backend: str, op: str) -> dict:
    """The kernel arguments the environment sets for ``op`` in ``backend`` (a variant's own
    options are laid over these)."""
    if backend == "triton" and op in ("attention", "attention_varlen"):
        return {"fwd_path": attention_fwd_path(), "dq_mode": attention_dq_mode(), "autotune": autotune()}
    if backend == "cuda" and op in ("attention", "attention_varlen"):
        return {"force_sm80": _flag("TFORMER_ATTENTION_FORCE_SM80", False),
                "force_sm80_backward": _flag("TFORMER_ATTENTION_BWD_FORCE_SM80", False),
                "force_sm80_banded": _flag("TFORMER_ATTENTION_BAND_FORCE_SM80", False)}
    return {}


def active() -> dict[str, str]:
    """The override variables set in this process, for ``tformer env`` and bug reports."""
    return {name: os.environ[name] for name in VARIABLES if os.environ.get(name)}
