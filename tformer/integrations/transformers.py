"""tformer as a Hugging Face transformers attention backend.

``import tformer.integrations.transformers`` registers ``"tformer"`` in transformers'
``AttentionInterface`` (the attention call) and ``AttentionMaskInterface`` (the mask each
model builds once per forward), so any model written against the attention interface can
run tformer's kernels::

    import tformer.integrations.transformers  # registers "tformer"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tformer")
    # or: model.set_attn_implementation("tformer"); or config._attn_implementation = "tformer"

The backend (Triton, CUDA, reference) is tformer's default: ``with tformer.backend("triton"):``
or ``TFORMER_BACKEND``.

How masks are read. For "tformer", transformers builds the same masks as for "sdpa": None
when the pattern is plain causal or full attention without padding (``is_causal`` then says
which; top-left, as SDPA's, which transformers relies on for a static cache's prefill), else a
4-D bool mask ``(B, 1, Sq, Sk)``, True = attend. The 4-D mask is matched once per mask object
(every layer of a forward shares one; Gemma-2-style models alternate two) against the fused
op's patterns, ``keep[b, j] & band(i, j)``, with ``keep = mask.any(over queries)``: full; causal
aligned bottom-right (a KV cache) with the layer's ``sliding_window`` or without it; causal
top-left. Keys after the last one any query attends are cut off first (a view), which puts a
static cache's diagonal bottom-right too. That covers left and right padding, prefill, chunked
prefill and decoding against a cache, with or without sliding windows. A mask of any other
pattern (packed sequences, custom 4-D or float masks) runs the general reference path after a
one-time warning, with the same numbers. Query rows that see no key (left-padding positions)
give zeros, where eager gives an average over the masked keys: those positions are padding and
never read.

Mask polarity, in one place: Hugging Face's ``attention_mask`` (2-D from the tokenizer, and the
4-D bool mask built from it) is True/1 = a real token to attend; tformer's ``key_padding_mask``
is True = padding to ignore (as ``torch.nn.MultiheadAttention``'s). :func:`_match_pattern`
turns one into the other (``key_padding_mask = ~keep``); nothing else here flips a mask.

Sliding windows (Mistral, Qwen-2, Gemma-2: transformers passes the layer's ``sliding_window``,
a key ``j`` is seen by query ``i`` when ``i - sliding_window < j <= i``) run as
``window=(sliding_window - 1, 0)``; Gemma-2's ``softcap`` runs as tformer's ``softcap``.
Refused with an error, never approximated: attention sinks (``s_aux``), additive position
biases, and soft-capping on a mask only the general path takes.
``output_attentions=True`` returns no weights (as "sdpa"), with a one-time warning.

Grouped-query attention runs without repeating k/v; dropout uses the module's
``attention_dropout`` in training, as transformers passes it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from tformer import ops
from tformer.ops.attention_mask import band_mask, resolve_band
from tformer.nn.functional import reference_sdpa
from tformer.optional import import_failure

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # an optional dependency: say how to get it, and what really failed
    raise ImportError("tformer.integrations.transformers needs Hugging Face transformers with "
                      "AttentionInterface and masking_utils (tested with 5.25.0; pip install "
                      f"'tformer[transformers]'), and importing them failed: {import_failure(error)}") from error

logger = logging.getLogger("tformer")

ATTENTION_NAME = "tformer"

# Per-call keyword arguments that change the math in ways the kernels cannot express.
_REFUSED_KWARGS = {
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "an additive position bias",
}
# Config fields that switch those features on for a whole model (checked at the first mask).
_REFUSED_CONFIG: dict[str, str] = {}

_warned: set[str] = set()
# The last masks decoded and their patterns: every layer of one forward gets the same mask
# object (two alternating ones in models that mix sliding and full layers).
_DECODED_KEEP = 4
_decoded_masks: list[tuple[weakref.ref, int, int | None, object]] = []


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("tformer attention (transformers): %s", reason)


def _refuse(feature: str, where: str) -> None:
    raise NotImplementedError(f"attn_implementation='tformer' does not support {feature} ({where}); tformer's "
                              f"kernels would give different numbers. Use attn_implementation='sdpa' or 'eager' "
                              f"for this model")


def check_config(config) -> None:
    """Raise if ``config`` switches on an attention feature tformer refuses."""
    for field, feature in _REFUSED_CONFIG.items():
        value = getattr(config, field, None)
        if value is None or value is False:
            continue
        if field == "sliding_window" and getattr(config, "use_sliding_window", True) is False:
            continue  # e.g. Qwen2: the window is configured but switched off
        _refuse(feature, f"config.{field}={value!r}")


def tformer_mask(*args, config=None, **kwargs):
    """The mask for "tformer": transformers' SDPA mask (None, or bool (B, 1, Sq, Sk))."""
    if config is not None:
        check_config(config)
    return sdpa_mask(*args, config=config, **kwargs)


def tformer_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The attention call transformers makes: query ``(B, Hq, Sq, D)``, key/value
    ``(B, Hkv, Sk, D)``; returns ``(out (B, Sq, Hq, D), None)``."""
    for name, feature in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            _refuse(feature, f"{name}={kwargs[name]!r} was passed to the attention")
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions=True: tformer never materializes the attention weights; returning None")
    seq_q, seq_k = query.shape[2], key.shape[2]
    softcap = kwargs.get("softcap") or 0.0
    sliding_window = kwargs.get("sliding_window")

    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # One query (decoding) sees every cached key; top-left causal would hide them. A window
        # never matters here: transformers keeps the mask whenever the keys outrun the window.
        pattern = MaskPattern(bool(causal) and seq_q > 1, "top_left", None, None, seq_k)
    else:
        if attention_mask.shape[-1] > seq_k:  # some models hand a mask sized for a longer cache
            attention_mask = attention_mask[..., :seq_k]
        pattern = _decode(attention_mask, query.shape[0], seq_q, seq_k, sliding_window)

    if pattern is None:
        if softcap:
            _refuse("attention logit soft-capping", "with a mask only the general path takes")
        out = reference_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                             enable_gqa=True)
    else:
        end = pattern.key_end  # keys past it are attended by no query: a view drops them
        out = ops.attention(query, key[:, :, :end], value[:, :, :end], causal=pattern.causal,
                            alignment=pattern.alignment, window=pattern.window, softcap=softcap,
                            key_padding_mask=pattern.key_padding_mask, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


@dataclass(frozen=True)
class MaskPattern:
    """What the fused op takes to reproduce a mask: ``ops.attention``'s ``causal``,
    ``alignment``, ``window`` and ``key_padding_mask`` on the keys ``[:key_end]``."""

    causal: bool
    alignment: str
    window: tuple[int, int] | None
    key_padding_mask: torch.Tensor | None
    key_end: int


def _decode(mask: torch.Tensor, batch: int, seq_q: int, seq_k: int, sliding_window: int | None = None):
    """The :class:`MaskPattern` that reproduces ``mask``, or None."""
    for ref, version, window, pattern in _decoded_masks:
        if ref() is mask and version == mask._version and window == sliding_window:
            return pattern
    pattern = _match_pattern(mask, batch, seq_q, seq_k, sliding_window)
    if pattern is None:
        _warn_once(f"a {str(mask.dtype).removeprefix('torch.')} attention mask of shape {tuple(mask.shape)} "
                   f"that is not causal/sliding-window + key padding; running the general (unfused) reference path")
    _decoded_masks.insert(0, (weakref.ref(mask), mask._version, sliding_window, pattern))
    del _decoded_masks[_DECODED_KEEP:]
    return pattern


def _match_pattern(mask: torch.Tensor, batch: int, seq_q: int, seq_k: int, sliding_window: int | None = None):
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, batch):
        return None
    if mask.shape[1] != 1:
        if mask.stride(1) != 0:
            return None  # a different mask per head
        mask = mask[:, :1]
    if mask.shape[2] not in (1, seq_q) or mask.shape[3] != seq_k:
        return None
    rows = mask[:, 0]  # (B, Sq or 1, Sk)
    # Hugging Face's polarity (True = attend) becomes tformer's (True = padding) here, once.
    keep = rows.any(dim=1)  # (B, Sk): keys some query attends; the others are padding
    attended = keep.any(dim=0).nonzero()
    end = int(attended.max()) + 1 if attended.numel() else seq_k
    rows, keep = rows[..., :end], keep[:, :end]
    key_padding_mask = None if bool(keep.all()) else (~keep).expand(batch, end).contiguous()
    if rows.shape[1] == 1 or rows.stride(1) == 0 or torch.equal(rows, keep[:, None, :].expand_as(rows)):
        return MaskPattern(False, "top_left", None, key_padding_mask, end)
    # Causal with the layer's window (if any), then without: bottom-right on the kept keys (a
    # cache: query i is token end - Sq + i), else top-left (a batch whose last tokens are padding).
    windows = [(sliding_window - 1, 0)] if sliding_window else []
    for window in (*windows, None):
        for alignment in ("bottom_right", "top_left"):
            band = band_mask(seq_q, end, resolve_band("tformer attention", True, window, alignment), mask.device)
            if torch.equal(rows, (keep[:, None, :] & band).expand_as(rows)):
                return MaskPattern(True, alignment, window, key_padding_mask, end)
    return None


def register(name: str = ATTENTION_NAME) -> None:
    """Register tformer's attention and mask functions under ``name`` (done at import)."""
    AttentionInterface.register(name, tformer_attention_forward)
    AttentionMaskInterface.register(name, tformer_mask)


register()
