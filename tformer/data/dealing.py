"""Dealing batches to data-parallel ranks: the one place every task's batches are dealt.

Under ZeRO-3 and FSDP2 each forward pass gathers sharded weights with collectives, so every
rank must run the same number of forward passes: a rank that ran one more would wait forever
for the others (a hang, not an error). Two rules follow, one per phase:

* training: :class:`BatchStream` deals each epoch's batches round-robin and drops the tail
  that not every rank can share, so every rank yields exactly as many batches; its state is
  the epoch and the position in it, so a resumed stream continues exactly;
* random draws without epochs (the LM's windows): every rank draws the same global batch
  from one seeded generator and keeps its :func:`rank_share`;
* evaluation: :func:`deal_batches` deals batches round-robin and pads the ranks that run
  short with ``None``; the task turns each ``None`` into a filler batch (real data, any size)
  whose results it drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch

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
    _check_rank(rank, world_size)
    per_rank = -(-len(batches) // world_size)
    mine: list[T | None] = list(batches[rank::world_size])
    return mine + [None] * (per_rank - len(mine))


def rank_share(global_batch: Sequence[T], *, rank: int, world_size: int) -> Sequence[T]:
    """Rank ``rank``'s contiguous ``len / world_size`` items of a global batch every rank drew
    alike, so N ranks with batch B see exactly what one process with batch N*B sees."""
    _check_rank(rank, world_size)
    if len(global_batch) % world_size:
        raise ValueError(f"rank_share: a global batch of {len(global_batch)} items does not split over "
                         f"world_size={world_size} ranks")
    size = len(global_batch) // world_size
    return global_batch[rank * size:(rank + 1) * size]


class EpochBatches(Protocol):
    """An order of batches that depends only on the epoch (:class:`~tformer.data.buckets.LengthBucketBatches`,
    :class:`ShuffledBatches`)."""

    def batches(self, epoch: int) -> list[list[int]]: ...


class ShuffledBatches:
    """Batches of ``batch_size`` item indices, in a random order per epoch drawn from
    ``torch.randperm`` seeded by ``seed + seed_stride * epoch`` (the last batch may be shorter)."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int, seed_stride: int = 7919):
        if num_items < 1:
            raise ValueError(f"ShuffledBatches: argument 'num_items' must be >= 1, got {num_items}")
        self.num_items, self.batch_size, self.seed, self.seed_stride = num_items, batch_size, seed, seed_stride

    def batches(self, epoch: int = 0) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.seed_stride * epoch)
        return split_into_batches(torch.randperm(self.num_items, generator=generator).tolist(), self.batch_size)


def _rank_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s batches of one epoch: every ``world_size``-th, up to the batches every rank
    can share. An epoch of fewer batches than ranks gives each rank one (some batches twice), so
    no rank is left with none while the others step."""
    if len(batches) < world_size:
        return [batches[rank % len(batches)]]
    return batches[rank:len(batches) - len(batches) % world_size:world_size]


def batches_per_rank(batches: EpochBatches, world_size: int) -> int:
    """How many batches each rank's :class:`BatchStream` takes from one epoch."""
    return max(1, len(batches.batches(0)) // world_size)


class BatchStream:
    """This rank's training batches of item indices, epoch after epoch, from an
    :class:`EpochBatches` order: rank ``r`` takes batches ``r, r + W, r + 2W, ...`` of each
    epoch (``W`` = world size; an epoch's tail that not every rank can share is dropped, so
    every rank yields as many batches). ``state_dict`` is the epoch and the position in it, so
    a resumed stream continues exactly."""

    def __init__(self, batches: EpochBatches, *, rank: int = 0, world_size: int = 1):
        _check_rank(rank, world_size)
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.epoch, self.position, self._epoch_batches = 0, 0, None

    def next_indices(self) -> list[int]:
        return self.next_indices_and_place()[0]

    def next_indices_and_place(self) -> tuple[list[int], int]:
        """The next batch of indices, and its place in the epoch's global order (rank r's p-th
        batch is batch r + p * world_size), which does not depend on the number of ranks."""
        while True:
            if self._epoch_batches is None:
                self._epoch_batches = _rank_batches(self.batches.batches(self.epoch), self.rank, self.world_size)
            if self.position < len(self._epoch_batches):
                break
            self.epoch, self.position, self._epoch_batches = self.epoch + 1, 0, None
        self.position += 1
        return self._epoch_batches[self.position - 1], self.rank + (self.position - 1) * self.world_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._epoch_batches = int(state["epoch"]), int(state["position"]), None


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"dealing: rank={rank} must be in [0, world_size={world_size})")
