"""FlashAttention's test semantics, written for tformer's tests: ``attention_ref`` (the
definition FlashAttention's own tests check against), its padding masks and its acceptance rule.

Written from the behaviour of FlashAttention's ``tests/test_flash_attn.py`` (layout
``(B, S, H, D)``; bottom-right alignment measured with each batch row's real lengths; rows that
see no key are zeros), not copied. One deliberate difference: a window bound of -1 is unbounded
here, as in FlashAttention's kernels (its ``construct_local_mask`` reads a right bound of -1
literally when the left one is set; its tests never draw that case).
"""

from __future__ import annotations

import torch


def attention_ref(q, k, v, query_padding_mask=None, key_padding_mask=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, softmax_scale=None, upcast=True, reorder_ops=False, alignment="bottom_right"):
    """q ``(B, Sq, H, D)``, k and v ``(B, Sk, Hk, D)``; padding masks ``(B, S)`` bool with
    FlashAttention's polarity (True = a real token). Returns (out ``(B, Sq, H, D)``, probs
    ``(B, H, Sq, Sk)``) in q's dtype. ``upcast``: compute in float32 (float64 stays float64);
    else in q's dtype, with ``reorder_ops`` scaling k instead of q (FlashAttention's estimate of
    the error of a same-precision PyTorch implementation). ``alignment="top_left"`` (tformer's
    default, SDPA's) places the diagonal at offset 0 instead of ``len_k - len_q``."""
    dtype = q.dtype
    if upcast:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(work), k.to(work), v.to(work)
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k = k.shape[1]
    group = num_heads // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = torch.ones(batch, 1, seq_q, seq_k, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed &= key_padding_mask[:, None, None, :]
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    if left >= 0 or right >= 0:
        # Each batch row's real lengths place its diagonal (bottom-right alignment).
        len_k = key_padding_mask.sum(-1) if key_padding_mask is not None else torch.full((batch,), seq_k)
        len_q = query_padding_mask.sum(-1) if query_padding_mask is not None else torch.full((batch,), seq_q)
        offset = (len_k - len_q) if alignment == "bottom_right" else torch.zeros(batch, dtype=torch.long)
        rows = torch.arange(seq_q, device=q.device)[None, :, None] + offset.to(q.device)[:, None, None]
        cols = torch.arange(seq_k, device=q.device)[None, None, :]
        band = torch.ones(batch, seq_q, seq_k, dtype=torch.bool, device=q.device)
        if right >= 0:
            band &= cols <= rows + right
        if left >= 0:
            band &= cols >= rows - left
        allowed &= band[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees no key: zeros
    if query_padding_mask is not None:
        probs = probs.masked_fill(~query_padding_mask[:, None, :, None], 0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, v)
    if query_padding_mask is not None:
        out = out.masked_fill(~query_padding_mask[:, :, None, None], 0.0)
    return out.to(dtype), probs.to(dtype)


def padding_mask(max_seqlen: int, batch: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """(B, S) bool, True = a real token, right padded: "full" (no padding), "random" (lengths in
    [S - 20, S]) or "third" (lengths in [S // 3, S]), as FlashAttention's tests draw them."""
    if mode == "full":
        lengths = torch.full((batch,), max_seqlen)
    elif mode == "random":
        lengths = torch.randint(max(1, max_seqlen - 20), max_seqlen + 1, (batch,), generator=generator)
    elif mode == "third":
        lengths = torch.randint(max(1, max_seqlen // 3), max_seqlen + 1, (batch,), generator=generator)
    else:
        raise ValueError(f"padding_mask: argument 'mode' must be 'full', 'random' or 'third', got {mode!r}")
    return torch.arange(max_seqlen)[None, :] < lengths[:, None]


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, S, ...) and its (B, S) mask -> (packed (total, ...), cu_seqlens int32, max_seqlen)."""
    lengths = mask.sum(-1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return x[mask], cu.to(x.device), int(lengths.max())


def pad(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpad`: zeros where the mask is False."""
    out = packed.new_zeros(*mask.shape, *packed.shape[1:])
    out[mask] = packed
    return out


# An absolute floor for a quantity that is exactly 0 in float64 and in the PyTorch path (a query
# that sees a single key has p = 1 and dS = 0, so dq = 0): float32 softmax arithmetic leaves
# ~1e-7 there, which no multiple of 0 allows.
ZERO_FLOOR = 1e-6


def rounding_floor(reference: torch.Tensor) -> float:
    """FlashAttention's floor on an error bound: twice the float32 rounding at the reference's
    magnitude (``(x + 0.3 - 0.3 - x)``), so an exact same-precision path does not demand 0,
    plus :data:`ZERO_FLOOR`."""
    ref = reference.float()
    return 2 * (ref + 0.3 - 0.3 - ref).abs().max().item() + ZERO_FLOOR


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def assert_within_flash_rule(name: str, got, same_precision, reference, factor: float, extra_floor: float = 0.0):
    """FlashAttention's acceptance rule: the error of ``got`` against the high-precision
    ``reference`` is at most ``factor`` times the error of the same-precision PyTorch path, plus
    the rounding floor."""
    err = max_error(got, reference)
    bound = factor * max_error(same_precision, reference) + rounding_floor(reference) + extra_floor
    assert err <= bound, \
        f"{name}: max error {err:.3e} > {factor} x PyTorch's same-precision error + floor = {bound:.3e}"
