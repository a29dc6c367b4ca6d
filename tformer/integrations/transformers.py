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
which), else a 4-D bool mask ``(B, 1, Sq, Sk)``, True = attend. tformer's kernels take causal
(top-left aligned) plus a key-padding mask, so the 4-D mask is matched once per forward (the
result is reused by every layer) against ``keep[b, j] & (j <= i if causal)``, with
``keep = mask.any(over queries)``; that covers left and right padding, prefill and one-token
decoding. A mask of any other pattern (packed sequences, chunked prefill against a cache,
custom 4-D or float masks) runs the general reference path after a one-time warning, with the
same numbers. Query rows that see no key (left-padding positions) give zeros, where eager
gives an average over the masked keys: those positions are padding and never read.

Refused with an error at the first forward, never approximated: sliding-window attention,
attention logit soft-capping, attention sinks (``s_aux``) and additive position biases.
``output_attentions=True`` returns no weights (as "sdpa"), with a one-time warning.

Grouped-query attention runs without repeating k/v; dropout uses the module's
``attention_dropout`` in training, as transformers passes it.
"""

from __future__ import annotations

import logging
import weakref

import torch

from tformer import ops
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
    "sliding_window": "sliding-window attention",
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "an additive position bias",
}
# Config fields that switch those features on for a whole model (checked at the first mask).
_REFUSED_CONFIG = {
    "sliding_window": "sliding-window attention",
    "attn_logit_softcapping": "attention logit soft-capping",
}

_warned: set[str] = set()
# The last mask decoded and its pattern: every layer of one forward gets the same mask object.
_decoded_mask: tuple[weakref.ref, int, object] | None = None


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

    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # One query (decoding) sees every cached key; top-left causal would hide them.
        pattern = (bool(causal) and seq_q > 1, None)
    else:
        if attention_mask.shape[-1] > seq_k:  # some models hand a mask sized for a longer cache
            attention_mask = attention_mask[..., :seq_k]
        pattern = _decode(attention_mask, query.shape[0], seq_q, seq_k)

    if pattern is None:
        out = reference_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                             enable_gqa=True)
    else:
        causal, key_padding_mask = pattern
        out = ops.attention(query, key, value, causal=causal, key_padding_mask=key_padding_mask, scale=scaling,
                            dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def _decode(mask: torch.Tensor, batch: int, seq_q: int, seq_k: int):
    """``(causal, key_padding_mask (B, Sk) or None)`` that reproduce ``mask``, or None."""
    global _decoded_mask
    if _decoded_mask is not None and _decoded_mask[0]() is mask and _decoded_mask[1] == mask._version:
        return _decoded_mask[2]
    pattern = _match_pattern(mask, batch, seq_q, seq_k)
    if pattern is None:
        _warn_once(f"a {str(mask.dtype).removeprefix('torch.')} attention mask of shape {tuple(mask.shape)} "
                   f"that is not causal + key padding; running the general (unfused) reference path")
    _decoded_mask = (weakref.ref(mask), mask._version, pattern)
    return pattern


def _match_pattern(mask: torch.Tensor, batch: int, seq_q: int, seq_k: int):
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, batch):
        return None
    if mask.shape[1] != 1:
        if mask.stride(1) != 0:
            return None  # a different mask per head
        mask = mask[:, :1]
    if mask.shape[2] not in (1, seq_q) or mask.shape[3] != seq_k:
        return None
    rows = mask[:, 0]  # (B, Sq or 1, Sk)
    keep = rows.any(dim=1)  # (B, Sk): keys some query attends; the others are padding
    key_padding_mask = None if bool(keep.all()) else (~keep).expand(batch, seq_k).contiguous()
    if rows.shape[1] == 1 or rows.stride(1) == 0 or torch.equal(rows, keep[:, None, :].expand_as(rows)):
        return False, key_padding_mask
    causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=mask.device).tril()
    if torch.equal(rows, (keep[:, None, :] & causal).expand_as(rows)):
        return True, key_padding_mask
    return None


def register(name: str = ATTENTION_NAME) -> None:
    """Register tformer's attention and mask functions under ``name`` (done at import)."""
    AttentionInterface.register(name, tformer_attention_forward)
    AttentionMaskInterface.register(name, tformer_mask)


register()
