"""Dealing evaluation batches to data-parallel ranks: the one rule every task follows.

Under ZeRO-3 and FSDP2 each forward pass gathers sharded weights with collectives, so every
rank must run the same number of forward passes: a rank that ran one more would wait forever
for the others (a hang, not an error). :func:`deal_batches` deals batches round-robin and pads
the ranks that run short with ``None``; the task turns each ``None`` into a filler batch (real
data, any size) whose results it drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_into_batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """Consecutive batches of ``batch_size`` items (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"split_into_batches: argument 'batch_size' must be >= 1, got {batch_size}")
    return [list(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]


def deal_batches(batches: Sequence[T], *, world_size: int, rank: int) -> list[T | None]:
    """Rank ``rank``'s share of ``batches``: batches ``rank, rank + W, ...`` (``W`` =
    ``world_size``), then ``None`` (filler) up to ``ceil(len(batches) / W)``, so every rank
    gets the same number of entries and every batch goes to exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"deal_batches: rank={rank} must be in [0, world_size={world_size})")
    per_rank = -(-len(batches) // world_size)
    mine: list[T | None] = list(batches[rank::world_size])
    return mine + [None] * (per_rank - len(mine))
