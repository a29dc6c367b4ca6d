"""``KVCache``: per-layer keys and values of the tokens decoded so far, for sampling."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values per layer, each ``(B, Hkv, S_max, D)``, and ``length``, the number of
    positions filled. Pass it to ``DecoderLM.forward(tokens, cache=cache)``: each layer
    writes the new tokens' keys and values at ``[length, length + T)`` and attends to
    ``[0, length + T)``; the model then advances ``length`` by T.

    For inference (under ``torch.no_grad()``): the buffers are written in place.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, *,
                 device=None, dtype=None):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("max_seq_len", max_seq_len), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: argument '{name}' must be a positive int, got {value!r}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, *, max_seq_len: int | None = None, device=None, dtype=None):
        """A cache that fits ``model`` (anything with a ``config`` like :class:`ModelConfig`),
        on the device and dtype of its parameters unless given."""
        config = model.config
        parameter = next(model.parameters())
        return cls(max(config.n_layers, 1), batch_size, config.n_kv_heads, max_seq_len or config.max_seq_len,
                   config.head_dim, device=device or parameter.device, dtype=dtype or parameter.dtype)

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"KVCache: tokens have batch size {batch_size}, the cache was made for {self.batch_size}")
        if self.length + new_tokens > self.max_seq_len:
            raise ValueError(f"KVCache: {new_tokens} new tokens after {self.length} cached ones exceed the cache's "
                             f"max_seq_len={self.max_seq_len}")

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store k, v ``(B, Hkv, T, D)`` at positions ``[start, start + T)`` of layer
        ``layer_index``; return the keys and values of ``[0, start + T)``."""
        if start != self.length:
            raise ValueError(f"KVCache: layer {layer_index} writes at position {start} but the cache holds "
                             f"{self.length} positions")
        end = start + k.shape[2]
        keys, values = self.keys[layer_index], self.values[layer_index]
        if k.shape[:2] != keys.shape[:2] or k.shape[3] != keys.shape[3] or end > self.max_seq_len:
            raise ValueError(f"KVCache: layer {layer_index} got keys of shape {tuple(k.shape)} at position {start}; "
                             f"the cache holds {tuple(keys.shape)} (B, Hkv, S_max, D)")
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Count ``new_tokens`` more positions as filled (after every layer has written them)."""
        self.length += new_tokens

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` ``(B,)`` int64 (beam search: each beam continues a parent)."""
        self.keys = [keys[rows] for keys in self.keys]
        self.values = [values[rows] for values in self.values]

    def reset(self) -> None:
        self.length = 0


def first_position(caller: str, tokens: torch.Tensor, cache: KVCache | None) -> int:
    """The absolute position of ``tokens[:, 0]``: 0 without a cache, else the cached length.
    Checks that tokens is ``(B, T)`` int64 and that the cache has room for them."""
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"{caller}: argument 'tokens' must be a (B, T) int64 tensor, got shape "
                         f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
    if cache is None:
        return 0
    cache.check_room(*tokens.shape)
    return cache.length
