"""``tformer.patch(model)``: swap a built model's ``torch.nn.MultiheadAttention`` and
``torch.nn.LayerNorm`` modules for tformer's drop-ins, in place; ``tformer.unpatch(model)``
puts the original module objects back.

The replacements share the originals' ``Parameter`` objects (no copy), so weights, an
optimizer built before patching, and training done while patched all carry over, both ways.

``torch.nn.TransformerEncoderLayer`` and ``TransformerEncoder`` have an inference fast path
(eval mode, no grad) that reads the attention and norm weights and calls
``torch._transformer_encoder_layer_fwd`` / builds nested tensors, never calling the
submodules. Patching turns that fast path off for the layers it touches (and restores it on
unpatch), so the patched model really runs tformer's modules in train and in eval.
"""

from __future__ import annotations

import torch
from torch import nn

_STATE_ATTR = "_tformer_patch_state"


def patch(model: nn.Module, attention: bool = True, layer_norm: bool = True,
          backend: str | None = None) -> dict[str, nn.Module]:
    """Replace, in place, every ``torch.nn.MultiheadAttention`` (``attention=True``) and
    ``torch.nn.LayerNorm`` (``layer_norm=True``) inside ``model`` (exact types, not
    subclasses) by ``tformer.nn.MultiheadAttention`` / ``tformer.nn.LayerNorm`` running on
    ``backend`` (None: tformer's default).

    Returns ``{qualified name: original module}`` of what it replaced ("" for ``model``
    itself, which cannot be replaced in place and is refused). Raises before changing
    anything if a module cannot be replaced (e.g. ``add_bias_kv=True``). Patching an
    already patched model replaces what is left and keeps the first originals for unpatch.
    """
    from tformer import nn as tnn

    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, module) for name, module in model.named_modules()
               if (attention and type(module) is nn.MultiheadAttention)
               or (layer_norm and type(module) is nn.LayerNorm)]
    if any(name == "" for name, _ in targets):
        raise ValueError(f"patch: 'model' is itself a {type(model).__name__}; patch the module that contains it")
    for name, module in targets:
        if isinstance(module, nn.MultiheadAttention) and (module.bias_k is not None or module.add_zero_attn):
            raise ValueError(f"patch: {name!r} is a MultiheadAttention with add_bias_kv or add_zero_attn, which "
                             f"tformer.nn.MultiheadAttention does not support; pass attention=False to keep "
                             f"torch's attention")

    state = getattr(model, _STATE_ATTR, None) or {"modules": {}, "fast_path": {}}
    replaced: dict[str, nn.Module] = {}
    for name, original in targets:
        replacement = (_tformer_attention(original, backend, tnn) if isinstance(original, nn.MultiheadAttention)
                       else _tformer_layer_norm(original, backend, tnn))
        _share_parameters(original, replacement, name)
        replacement.train(original.training)
        model.set_submodule(name, replacement)
        replaced[name] = original
        state["modules"].setdefault(name, original)
    _disable_encoder_fast_paths(model, state["fast_path"])
    object.__setattr__(model, _STATE_ATTR, state)  # not a submodule: keep it out of state_dict
    return replaced


def unpatch(model: nn.Module) -> dict[str, nn.Module]:
    """Put back the original modules :func:`patch` replaced (the same objects, holding any
    training done while patched, since parameters were shared) and re-enable the encoder
    fast paths. Returns ``{qualified name: tformer module removed}``; ``{}`` if not patched."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return {}
    removed = {}
    for name, original in state["modules"].items():
        removed[name] = model.get_submodule(name)
        model.set_submodule(name, original)
    for name, (attr, value) in state["fast_path"].items():
        setattr(model.get_submodule(name), attr, value)
    object.__delattr__(model, _STATE_ATTR)
    return removed


def _tformer_attention(original: nn.MultiheadAttention, backend, tnn) -> nn.Module:
    weight = original.in_proj_weight if original.in_proj_weight is not None else original.q_proj_weight
    factory = dict(device=weight.device, dtype=weight.dtype)
    # Build on the meta device: the parameters are replaced by the originals right after.
    with torch.device("meta"):
        module = tnn.MultiheadAttention(original.embed_dim, original.num_heads, dropout=original.dropout,
                                        bias=original.in_proj_bias is not None, kdim=original.kdim,
                                        vdim=original.vdim, batch_first=original.batch_first,
                                        dtype=factory["dtype"], backend=backend)
    return module


def _tformer_layer_norm(original: nn.LayerNorm, backend, tnn) -> nn.Module:
    with torch.device("meta"):
        return tnn.LayerNorm(original.normalized_shape, eps=original.eps,
                             elementwise_affine=original.elementwise_affine, bias=original.bias is not None,
                             dtype=None if original.weight is None else original.weight.dtype, backend=backend)


def _share_parameters(original: nn.Module, replacement: nn.Module, name: str) -> None:
    """Point ``replacement``'s parameters and buffers at ``original``'s (same objects)."""
    old = dict(original.named_parameters(recurse=True)) | dict(original.named_buffers(recurse=True))
    new = dict(replacement.named_parameters(recurse=True)) | dict(replacement.named_buffers(recurse=True))
    if old.keys() != new.keys():
        raise RuntimeError(f"patch: {name!r}: tformer's {type(replacement).__name__} holds {sorted(new)} but the "
                           f"original holds {sorted(old)}; the drop-in must keep torch's state_dict keys")
    for key, tensor in old.items():
        owner_path, _, leaf = key.rpartition(".")
        owner = replacement.get_submodule(owner_path) if owner_path else replacement
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor
        else:
            owner._buffers[leaf] = tensor


def _disable_encoder_fast_paths(model: nn.Module, saved: dict) -> None:
    """Turn off torch's encoder inference fast paths, which bypass the submodules.

    ``TransformerEncoderLayer`` takes its fast path only when ``activation_relu_or_gelu`` is
    non-zero (the attribute is read by nothing else); ``TransformerEncoder`` converts padded
    input to nested tensors only when ``use_nested_tensor`` is True.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and _holds_tformer(module):
            saved.setdefault(name, ("activation_relu_or_gelu", module.activation_relu_or_gelu))
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder) and _holds_tformer(module):
            saved.setdefault(name, ("use_nested_tensor", module.use_nested_tensor))
            module.use_nested_tensor = False


def _holds_tformer(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("tformer.") for m in module.modules())
