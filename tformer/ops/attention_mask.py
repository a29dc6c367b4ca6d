"""Which keys a query may attend: causal alignment, sliding windows and key padding, defined once.

Every backend implements the same rule, and backends that take a boolean mask (the reference,
a torch/SDPA backend) build it with :func:`allowed_keys`. The fused kernels compute the same
rule per tile from :class:`Band`'s two integers and the alignment.

The rule (FlashAttention's ``window_size``): query ``i`` of a sequence of ``Sq`` queries may
attend key ``j`` of ``Sk`` keys when

    i + offset - left  <=  j  <=  i + offset + right

where ``offset`` is 0 for ``alignment="top_left"`` (SDPA's ``is_causal``: query 0 lines up with
key 0) and ``Sk - Sq`` for ``alignment="bottom_right"`` (FlashAttention since 2.1: the last
query lines up with the last key, as when new queries are appended to a KV cache). A bound of
-1 is unbounded. ``causal=True`` is ``right = 0``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch

Alignment = Literal["top_left", "bottom_right"]
ALIGNMENTS: tuple[str, ...] = ("top_left", "bottom_right")


@dataclass(frozen=True)
class Band:
    """The causal/sliding-window band, validated. ``left``/``right``: keys allowed before and
    after the aligned diagonal, -1 unbounded. ``bottom_right``: the diagonal ends at the last
    key (offset ``Sk - Sq``) instead of starting at the first (offset 0)."""

    left: int = -1
    right: int = -1
    bottom_right: bool = False

    @property
    def is_full(self) -> bool:
        """True when no key is cut off by the band (plain attention)."""
        return self.left < 0 and self.right < 0

    def offset(self, seq_q: int, seq_k: int) -> int:
        return seq_k - seq_q if self.bottom_right else 0


TOP_LEFT_CAUSAL = Band(left=-1, right=0, bottom_right=False)
"""SDPA's ``is_causal``: the band a plain causal call resolves to (this very object)."""

# window=None: one Band per (causal, alignment), built once.
_PLAIN_BANDS: dict[tuple[bool, str], Band] = {(True, "top_left"): TOP_LEFT_CAUSAL}


def resolve_band(op: str, causal, window, alignment) -> Band:
    """Validate ``causal``, ``window`` and ``alignment`` and fold them into one :class:`Band`.

    Raises:
        TypeError / ValueError naming the argument: ``causal`` not a bool (``"bottom_right"`` is
            not a causal flag: pass ``alignment="bottom_right"``), ``alignment`` not one of
            :data:`ALIGNMENTS`, ``window`` not a pair of ints >= -1, or a right window bound
            above 0 together with ``causal=True``.
    """
    if window is None and type(causal) is bool and type(alignment) is str:  # a model call: checked before
        band = _PLAIN_BANDS.get((causal, alignment))
        if band is not None:
            return band
    if not isinstance(causal, bool):
        hint = (f"; for FlashAttention's alignment pass causal=True, alignment={causal!r}"
                if causal in ALIGNMENTS else "")
        raise TypeError(f"{op}: argument 'causal' must be a bool, got {causal!r}{hint}")
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"{op}: argument 'alignment' must be one of {', '.join(map(repr, ALIGNMENTS))}, "
                         f"got {alignment!r}")
    left, right = _window_pair(op, window)
    if causal:
        if right > 0:
            raise ValueError(f"{op}: argument 'window' has right bound {right} but causal=True allows no key after "
                             f"the diagonal; pass window=({left}, 0) or ({left}, -1), or causal=False")
        right = 0
    band = Band(left, right, alignment == "bottom_right")
    if window is None:
        _PLAIN_BANDS[(causal, alignment)] = band
    return band


def _window_pair(op: str, window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    try:
        left, right = (operator.index(bound) for bound in window)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{op}: argument 'window' must be None or a pair of ints (left, right), got {window!r}") \
            from error
    if left < -1 or right < -1:
        raise ValueError(f"{op}: argument 'window' bounds must be >= 0, or -1 for unbounded, got {(left, right)}")
    return left, right


def softcap_value(op: str, softcap) -> float:
    """``softcap`` as a float >= 0 (0 = off). Raises ValueError naming it otherwise."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0 \
            or softcap == float("inf"):
        raise ValueError(f"{op}: argument 'softcap' must be a finite float >= 0 (0 disables it), got {softcap!r}")
    return float(softcap)


def band_mask(seq_q: int, seq_k: int, band: Band, device=None) -> torch.Tensor | None:
    """Bool ``(Sq, Sk)``: True where query ``i`` may attend key ``j`` under ``band``; None for
    a full band (every key allowed)."""
    if band.is_full:
        return None
    rows = torch.arange(seq_q, device=device)[:, None] + band.offset(seq_q, seq_k)
    cols = torch.arange(seq_k, device=device)[None, :]
    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if band.right >= 0:
        allowed &= cols <= rows + band.right
    if band.left >= 0:
        allowed &= cols >= rows - band.left
    return allowed


def allowed_keys(seq_q: int, seq_k: int, band: Band, key_padding_mask: torch.Tensor | None,
                 device=None) -> torch.Tensor | None:
    """Bool ``(B or 1, 1, Sq, Sk)``: True where query ``i`` may attend key ``j`` (the band, and
    ``key_padding_mask`` ``(B, Sk)`` with True marking a padding key), or None when every key is
    allowed. SDPA's ``attn_mask`` has the same polarity (True takes part); note that SDPA gives
    NaN for a row with no allowed key, where tformer gives zeros."""
    allowed = band_mask(seq_q, seq_k, band, device)
    allowed = None if allowed is None else allowed[None, None]
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed
