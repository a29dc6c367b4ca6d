"""A resumable stream of training batches over one data set, for a task that reads several."""

from __future__ import annotations

from tformer.data.buckets import LengthBucketBatches


class BatchStream:
    """This rank's batches of example indices, epoch after epoch, from a
    :class:`LengthBucketBatches` order: rank ``r`` takes batches ``r, r + W, r + 2W, ...`` of
    each epoch (``W`` = world size; an epoch's tail that not every rank can share is dropped).
    ``state_dict`` is the epoch and the position in it, so a resumed stream continues exactly."""

    def __init__(self, batches: LengthBucketBatches, *, rank: int = 0, world_size: int = 1):
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.epoch, self.position, self._epoch_batches = 0, 0, None

    def next_indices(self) -> list[int]:
        while True:
            if self._epoch_batches is None:
                batches = self.batches.batches(self.epoch)
                usable = len(batches) - len(batches) % self.world_size or len(batches)
                self._epoch_batches = batches[self.rank:usable:self.world_size]
            if self.position < len(self._epoch_batches):
                break
            self.epoch, self.position, self._epoch_batches = self.epoch + 1, 0, None
        self.position += 1
        return self._epoch_batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._epoch_batches = int(state["epoch"]), int(state["position"]), None
