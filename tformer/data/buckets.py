"""Batches of variable-length sequences with little padding: head+tail truncation,
length-bucketed batch order, and padding with a key padding mask for attention.

Bucketing follows the usual "sort within a shuffled pool" recipe (as in fairseq's and
AllenNLP's bucket iterators): shuffle all examples, cut the order into pools of
``batch_size * pool_batches``, sort each pool by length, cut it into batches, and shuffle
the batches. Batches then hold sequences of similar length (little padding) while the
order still changes every epoch.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from tformer.data.dealing import deal_batches, split_into_batches


def truncate_head_tail(ids: Sequence[int], max_len: int, head: int) -> list[int]:
    """Keep the first ``head`` and the last ``max_len - head`` tokens of a sequence longer than
    ``max_len`` (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification", sec. 5.3:
    head+tail beats head-only on IMDb, since reviews often end with the verdict)."""
    if not 0 <= head <= max_len:
        raise ValueError(f"truncate_head_tail: argument 'head' must be in [0, max_len={max_len}], got {head}")
    if len(ids) <= max_len:
        return list(ids)
    tail = max_len - head
    return list(ids[:head]) + (list(ids[-tail:]) if tail > 0 else [])


class LengthBucketBatches:
    """Batches of example indices, grouped by length.

    ``lengths[i]`` is the length of example ``i``. With ``shuffle`` the order depends only on
    ``(seed, epoch)``, so a resumed run that sets the same epoch and skips the batches it
    already consumed sees exactly the batches it would have seen. Without ``shuffle`` (for
    evaluation) examples are simply sorted by length: the least padding, a fixed order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0,
                 pool_batches: int = 50, drop_last: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"LengthBucketBatches: argument 'batch_size' must be a positive int, got {batch_size!r}")
        if not isinstance(pool_batches, int) or pool_batches < 1:
            raise ValueError(f"LengthBucketBatches: argument 'pool_batches' must be a positive int, got "
                             f"{pool_batches!r}")
        if len(lengths) == 0:
            raise ValueError("LengthBucketBatches: argument 'lengths' is empty; there is nothing to batch")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool_batches = pool_batches
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def batches(self, epoch: int = 0) -> list[list[int]]:
        """Every batch of ``epoch``, in order."""
        if not self.shuffle:
            order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
            return self._cut(order)
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        pool_size = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool_size):
            pool = sorted(order[start:start + pool_size], key=lambda i: self.lengths[i])
            batches.extend(self._cut(pool))
        # drop_last cuts each pool's short batch; keep only full batches then, to keep sizes equal.
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(0))

    def _cut(self, order: list[int]) -> list[list[int]]:
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, *, pad_to_multiple: int = 8, extra_positions: int = 0,
              max_width: int | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``sequences`` into ``tokens`` ``(B, S)`` int64 and ``key_padding_mask``
    ``(B, S)`` bool (True at padding, the convention of ``tformer.ops.attention``).

    ``S + extra_positions`` is the longest length plus ``extra_positions`` rounded up to
    ``pad_to_multiple`` (tensor-core friendly tiles); ``extra_positions`` counts what the model
    prepends itself (1 for a CLS embedding). The rounding never goes past ``max_width`` (the
    model's ``max_seq_len``). Every sequence must be non-empty, so no attention row is fully masked.
    """
    if len(sequences) == 0:
        raise ValueError("pad_batch: argument 'sequences' is empty")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"pad_batch: sequence {lengths.index(0)} is empty; every sequence needs at least one token")
    longest = max(lengths)
    width = -(-(longest + extra_positions) // pad_to_multiple) * pad_to_multiple - extra_positions
    if max_width is not None:
        width = max(longest, min(width, max_width))
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    key_padding_mask = torch.arange(width)[None, :] >= torch.as_tensor(lengths)[:, None]
    if device is not None:
        tokens, key_padding_mask = tokens.to(device), key_padding_mask.to(device)
    return tokens, key_padding_mask


def padding_fraction(lengths: Sequence[int], batches: list[list[int]], pad_to_multiple: int = 1) -> float:
    """The fraction of token slots that are padding over these batches (for logs and tests)."""
    used = total = 0
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        width = -(-longest // pad_to_multiple) * pad_to_multiple
        used += sum(lengths[i] for i in batch)
        total += width * len(batch)
    return 1.0 - used / total if total else 0.0


def deal_eval_batches(lengths: Sequence[int], batch_size: int, max_batches: int | None, *, world_size: int,
                      rank: int, seed: int) -> list[list[int] | None]:
    """This rank's evaluation batches (lists of item indices) over items of ``lengths``: all of
    them, or a fixed seeded sample of ``max_batches`` batches per rank, sorted by length (least
    padding) and dealt round-robin to ranks. A rank that runs short gets ``None`` (filler) so
    every rank runs as many forward passes."""
    indices = list(range(len(lengths)))
    if max_batches is not None and max_batches * batch_size * world_size < len(indices):
        indices = sorted(random.Random(seed).sample(indices, max_batches * batch_size * world_size))
    indices.sort(key=lambda i: lengths[i])
    return deal_batches(split_into_batches(indices, batch_size), world_size=world_size, rank=rank)
