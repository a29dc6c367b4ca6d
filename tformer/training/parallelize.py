"""Everything that changes how a plain model runs, applied after it is built, in one place
(torchtitan's ``parallelize`` pattern): per-block activation checkpointing, per-block
``torch.compile`` and FSDP2 sharding. The model code never knows about any of them; all act on
``model.blocks``.

The order is torchtitan's: activation checkpointing wraps each block first, so the compiled
graph holds the recomputation; each (wrapped) block is then compiled on its own, so the graphs
stay small and identical blocks reuse one compilation; FSDP2 shards last, around the compiled
blocks, so its all-gathers and reduce-scatters stay outside the graphs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

# checkpoint_wrapper puts the block under this attribute. Its state-dict hooks strip the prefix
# (so state dicts and checkpoints keep their keys); named_parameters() does not, hence clean_name.
WRAPPED_PREFIX = "_checkpoint_wrapped_module."


def clean_name(name: str) -> str:
    """A parameter name as the plain model spells it (no checkpoint-wrapper component)."""
    return name.replace(WRAPPED_PREFIX, "")


def _checkpoint_unless_decoding(function, *args, **kwargs):
    # Recompute the block in backward instead of storing its activations (Chen et al., 2016).
    # Without autograd there is nothing to recompute, and incremental decoding (a KV cache)
    # writes state, which must never run twice.
    if not torch.is_grad_enabled() or kwargs.get("kv_cache") is not None:
        return function(*args, **kwargs)
    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Wrap every ``every``-th block of ``model.blocks`` (blocks 0, k, 2k, ...) in torch's
    ``checkpoint_wrapper``, in place in the module that owns it; returns their indices. State-dict
    keys are unchanged (the wrapper strips its prefix on save and adds it on load)."""
    if every < 1:
        raise ValueError(f"apply_activation_checkpointing: argument 'every' must be >= 1, got {every}")
    blocks = _blocks(model)
    chosen = list(range(0, len(blocks), every))
    for index in chosen:
        block = blocks[index]
        if not isinstance(block, CheckpointWrapper):
            _replace(model, block, checkpoint_wrapper(block, checkpoint_fn=_checkpoint_unless_decoding))
    return chosen


def apply_compile(model: nn.Module, **compile_options) -> None:
    """``torch.compile`` each block of ``model.blocks`` in place (``nn.Module.compile``: names and
    state-dict keys are unchanged, no ``_orig_mod.`` prefix). The compiled call includes the
    module's hooks; FSDP2 registers its gathering hooks afterwards, and torch marks them
    ``_dynamo_disable``, so they run eagerly around each block's graph."""
    for block in _blocks(model):
        block.compile(**compile_options)


def apply_fsdp2(model: nn.Module, *, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
                reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """Shard each block, then the rest of the model, with ``torch.distributed.fsdp.fully_shard``.
    ``param_dtype`` (bf16/fp16) is the compute dtype of the MixedPrecisionPolicy; gradients are
    reduced in ``reduce_dtype`` and the sharded master weights stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in _blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward, mesh=mesh)
        # A block method other than forward that reads its weights (an encoder-decoder's
        # cross-attention projection of the encoder output, computed once before its decoder
        # layers run) must gather them too, else it meets sharded DTensor weights. A checkpoint
        # wrapper passes the attribute through to its block.
        for method in getattr(block, "forward_methods", ()):
            register_fsdp_forward_method(block, method)
    # The root keeps its parameters (embedding, final norm, head) gathered after forward: they
    # are needed again at the start of backward.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False, mesh=mesh)
    return model


def prepare_blocks(model: nn.Module, *, activation_checkpointing: bool, checkpoint_every: int = 1,
                   compile: bool = False) -> None:
    """The strategy-independent part, in torchtitan's order: checkpoint-wrap, then compile."""
    if activation_checkpointing:
        apply_activation_checkpointing(model, checkpoint_every)
    if compile:
        apply_compile(model)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits in ``model`` (``blocks`` may be a property that builds a
    fresh ModuleList, as in the encoder-decoder; its owners are the real parents)."""
    found = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is old and parent is not new:
                setattr(parent, name, new)
                found = True
    if not found:
        raise ValueError(f"parallelize: block {type(old).__name__} is not a submodule of {type(model).__name__}")


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"parallelize: {type(model).__name__} has no 'blocks' nn.ModuleList to wrap")
    return blocks
