"""``tformer.ops.attention`` and ``attention_varlen``: validate once, then dispatch."""

from __future__ import annotations

import math
import operator

import torch

from . import dispatch
from .attention_mask import resolve_band, softcap_value
from .validation import check_device, check_probability, check_same, check_shape, check_tensor


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              alignment: str = "top_left", window: tuple[int, int] | None = None, softcap: float = 0.0,
              key_padding_mask: torch.Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
              return_lse: bool = False, deterministic: bool = False, backend: str | None = None):
    """Scaled dot-product attention, ``softmax(q @ k^T * scale + masks) @ v``.

    Shapes: q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)`` (the layout of
    ``torch.nn.functional.scaled_dot_product_attention``), with ``Hq % Hkv == 0``:
    query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (grouped-query attention).

    - ``causal``: a bool. Query ``i`` sees keys up to the diagonal that ``alignment`` places.
    - ``alignment``: ``"top_left"`` (default, SDPA's ``is_causal``, ``torch.ones(Sq, Sk).tril()``:
      with ``Sq < Sk`` the last keys are seen by nobody) or ``"bottom_right"`` (FlashAttention's:
      the last query sees the last key, ``tril(diagonal=Sk - Sq)``, as when decoding after a KV
      cache; with ``Sq > Sk`` the first ``Sq - Sk`` rows see nothing and return zeros).
      It places the window's diagonal too. See ``tformer.ops.attention_mask``.
    - ``window``: ``(left, right)`` sliding window as FlashAttention's ``window_size``: query
      ``i`` sees keys ``i + offset - left ..= i + offset + right``; -1 is unbounded. Key blocks
      outside the band are skipped by the kernels, not only masked.
    - ``softcap``: logit soft-capping as Gemma 2, ``softcap * tanh(scores / softcap)`` on the
      scaled scores before the softmax; 0 disables it.
    - ``key_padding_mask``: ``(B, Sk)`` bool, True marks a padding key to ignore (as in
      ``torch.nn.MultiheadAttention``).
    - ``scale``: defaults to ``1 / sqrt(D)``.
    - ``dropout_p``: dropout on the attention probabilities (training only: pass 0.0 in eval).
    - A query row whose keys are all masked returns zeros (never NaN) and gets zero gradients.
    - ``return_lse``: also return the float32 log-sum-exp of the scaled, masked scores,
      ``(B, Hq, Sq)``; ``-inf`` for fully masked rows. It carries no gradient.
    - ``deterministic``: True asks for a backward that gives bitwise the same gradients run to
      run. False (default) lets a backend add gradients with atomics where that is faster: the
      CUDA backend's Hopper kernels add dQ with float32 atomics in one pass unless this is True
      (or ``torch.use_deterministic_algorithms(True)`` is on); the Triton backend refuses True
      with its atomic-dQ variant; the torch backend then runs SDPA's math kernel on a GPU.
    - ``backend``: ``"reference"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"``; None takes the
      default (``tformer.backend(...)`` block, else ``TFORMER_BACKEND``, else ``"auto"``).

    Returns ``out`` ``(B, Hq, Sq, D)`` in q's dtype, or ``(out, lse)``.
    """
    op = "attention"
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "k", k, ndim=4)
    check_tensor(op, "v", v, ndim=4)
    check_same(op, "q", q, k=k, v=v)
    batch, num_heads, _, head_dim = q.shape
    _, num_kv_heads, seq_k, _ = k.shape
    check_shape(op, "k", k, (batch, num_kv_heads, seq_k, head_dim), "(B, Hkv, Sk, D) matching q's B and D")
    check_shape(op, "v", v, k.shape, "k.shape")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{op}: q has {num_heads} heads and k/v have {num_kv_heads}; the number of query heads "
                         f"must be a multiple of the number of key/value heads")
    if key_padding_mask is not None:
        check_tensor(op, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        check_shape(op, "key_padding_mask", key_padding_mask, (batch, seq_k), "(B, Sk)")
        check_device(op, "key_padding_mask", key_padding_mask, q.device)
    check_probability(op, "dropout_p", dropout_p)
    scale = resolve_scale(op, scale, head_dim)
    band = resolve_band(op, causal, window, alignment)
    args = dict(q=q, k=k, v=v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                dropout_p=float(dropout_p), return_lse=bool(return_lse), band=band,
                softcap=softcap_value(op, softcap), deterministic=bool(deterministic))
    impl = dispatch.resolve(op, backend, q.device, q.dtype, args)
    return impl(**args)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     alignment: str = "top_left", window: tuple[int, int] | None = None, softcap: float = 0.0,
                     scale: float | None = None, dropout_p: float = 0.0, return_lse: bool = False,
                     deterministic: bool = False, backend: str | None = None):
    """Attention over packed variable-length sequences (no padding, no wasted work).

    q ``(total_q, Hq, D)``, k and v ``(total_k, Hkv, D)``; sequence ``i`` holds query tokens
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and key tokens ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``
    (``cu_seqlens_*`` int32, ``(num_seqs + 1,)``, starting at 0 and ending at or before the
    number of packed tokens: spare tokens after ``cu_seqlens_*[-1]`` belong to no sequence, get
    zero outputs, lse -inf and zero gradients). ``max_seqlen_*`` (ints, or integer-like such as
    ``np.int64``) bound the lengths. ``causal``, ``alignment``, ``window``, ``softcap`` and ``deterministic`` act
    within each sequence as in :func:`attention` (bottom-right uses each sequence's own lengths).
    Returns ``out`` ``(total_q, Hq, D)``, or ``(out, lse)`` with lse ``(Hq, total_q)`` float32.
    """
    op = "attention_varlen"
    check_tensor(op, "q", q, ndim=3)
    check_tensor(op, "k", k, ndim=3)
    check_tensor(op, "v", v, ndim=3)
    check_same(op, "q", q, k=k, v=v)
    _, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    check_shape(op, "k", k, (total_k, num_kv_heads, head_dim), "(total_k, Hkv, D) matching q's D")
    check_shape(op, "v", v, k.shape, "k.shape")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{op}: q has {num_heads} heads and k/v have {num_kv_heads}; the number of query heads "
                         f"must be a multiple of the number of key/value heads")
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, total_k)):
        check_tensor(op, name, cu, ndim=1, dtypes=(torch.int32,))
        check_device(op, name, cu, q.device)
        if cu.numel() < 2:
            raise ValueError(f"{op}: argument '{name}' must hold num_seqs + 1 >= 2 offsets, got {cu.numel()}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: 'cu_seqlens_q' has {cu_seqlens_q.numel()} offsets and 'cu_seqlens_k' has "
                         f"{cu_seqlens_k.numel()}; both must describe the same sequences")
    max_seqlen_q = _as_length(op, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _as_length(op, "max_seqlen_k", max_seqlen_k)
    if not torch.compiler.is_compiling():
        _check_offsets(op, "q", cu_seqlens_q, q.shape[0], max_seqlen_q)
        _check_offsets(op, "k", cu_seqlens_k, total_k, max_seqlen_k)
    check_probability(op, "dropout_p", dropout_p)
    scale = resolve_scale(op, scale, head_dim)
    band = resolve_band(op, causal, window, alignment)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k, causal=causal, scale=scale, dropout_p=float(dropout_p),
                return_lse=bool(return_lse), band=band, softcap=softcap_value(op, softcap),
                deterministic=bool(deterministic))
    impl = dispatch.resolve(op, backend, q.device, q.dtype, args)
    return impl(**args)


def _check_offsets(op: str, side: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """The offsets' values, at the cost of one tiny device-to-host copy (skipped under
    torch.compile): an offset past the packed tensor makes the kernels read out of bounds, and
    a ``max_seqlen`` below a real length sizes the grid too small, leaving rows unwritten.
    Tokens after the last offset are allowed (FlashAttention's callers pack into buffers with
    room to spare): they belong to no sequence and are left out."""
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or min(lengths) < 0 or offsets[-1] > total:
        raise ValueError(f"{op}: argument 'cu_seqlens_{side}' must start at 0, never decrease and end at most at "
                         f"{side}.shape[0] = {total}, got {offsets}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{op}: argument 'max_seqlen_{side}' must be at least the longest sequence, "
                         f"{max(lengths)}, got {max_seqlen}")


def _as_length(op: str, name: str, value) -> int:
    """An int-like length (``int``, ``np.int64``, a 0-d integer tensor) as an int >= 0."""
    try:
        if isinstance(value, bool):
            raise TypeError
        length = operator.index(value)
    except TypeError as error:
        raise ValueError(f"{op}: argument '{name}' must be a non-negative int, got {value!r}") from error
    if length < 0:
        raise ValueError(f"{op}: argument '{name}' must be a non-negative int, got {value!r}")
    return length


def resolve_scale(op: str, scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: argument 'scale' must be a finite float or None, got {scale!r}")
    return float(scale)
