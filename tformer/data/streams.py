"""A resumable stream of training batches over one data set (the classify and mlm tasks read
one; the multitask task one per task)."""

from __future__ import annotations

from tformer.data.buckets import LengthBucketBatches


def _usable(num_batches: int, world_size: int) -> int:
    """The batches of an epoch that every rank can share (all, when there are fewer than ranks)."""
    return num_batches - num_batches % world_size or num_batches


def batches_per_rank(batches: LengthBucketBatches, world_size: int) -> int:
    """How many batches each rank's :class:`BatchStream` takes from one epoch."""
    return _usable(len(batches.batches(0)), world_size) // world_size


class BatchStream:
    """This rank's batches of example indices, epoch after epoch, from a
    :class:`LengthBucketBatches` order: rank ``r`` takes batches ``r, r + W, r + 2W, ...`` of
    each epoch (``W`` = world size; an epoch's tail that not every rank can share is dropped).
    ``state_dict`` is the epoch and the position in it, so a resumed stream continues exactly."""

    def __init__(self, batches: LengthBucketBatches, *, rank: int = 0, world_size: int = 1):
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.epoch, self.position, self._epoch_batches = 0, 0, None

    def next_indices(self) -> list[int]:
        return self.next_indices_and_place()[0]

    def next_indices_and_place(self) -> tuple[list[int], int]:
        """The next batch of indices, and its place in the epoch's global order (rank r's p-th
        batch is batch r + p * world_size), which does not depend on the number of ranks."""
        while True:
            if self._epoch_batches is None:
                batches = self.batches.batches(self.epoch)
                self._epoch_batches = batches[self.rank:_usable(len(batches), self.world_size):self.world_size]
            if self.position < len(self._epoch_batches):
                break
            self.epoch, self.position, self._epoch_batches = self.epoch + 1, 0, None
        self.position += 1
        return self._epoch_batches[self.position - 1], self.rank + (self.position - 1) * self.world_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._epoch_batches = int(state["epoch"]), int(state["position"]), None
