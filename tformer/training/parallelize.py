"""Everything that changes how a plain model runs, applied after it is built, in one place
(torchtitan's ``parallelize`` pattern): per-block activation checkpointing and FSDP2 sharding.
The model code never knows about either; both act on ``model.blocks``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(original_forward, *args, **kwargs):
    # Recompute the block in backward instead of storing its activations (Chen et al., 2016).
    # Incremental decoding (a KV cache) writes state, so it is never recomputed.
    if not torch.is_grad_enabled() or kwargs.get("kv_cache") is not None:
        return original_forward(*args, **kwargs)
    return checkpoint(original_forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Checkpoint every ``every``-th block of ``model.blocks`` (blocks 0, k, 2k, ...); returns
    their indices. The block's ``forward`` is wrapped on the instance, so parameter names and
    state dicts are unchanged."""
    blocks = _blocks(model)
    if every < 1:
        raise ValueError(f"apply_activation_checkpointing: argument 'every' must be >= 1, got {every}")
    chosen = list(range(0, len(blocks), every))
    for index in chosen:
        block = blocks[index]
        block.forward = functools.partial(_checkpointed_forward, block.forward)
    return chosen


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
        # layers run) must gather them too, else it meets sharded DTensor weights.
        for method in getattr(block, "forward_methods", ()):
            register_fsdp_forward_method(block, method)
    # The root keeps its parameters (embedding, final norm, head) gathered after forward: they
    # are needed again at the start of backward.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False, mesh=mesh)
    return model


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"parallelize: {type(model).__name__} has no 'blocks' nn.ModuleList to wrap")
    return blocks
