"""Epoch-free sampling of random windows from a token stream, resumable exactly.

Every step draws fresh window starts from one seeded ``torch.Generator``. All data-parallel
ranks hold the same generator and draw the *global* micro-batch (``world_size * batch_size``
starts), each keeping its own slice: so N ranks with batch B see exactly the windows one
process with batch N*B sees, and the whole position of the sampler is the generator state,
which goes into checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch

from tformer.data.dealing import rank_share


class RandomWindowSampler:
    """Draws ``(inputs, targets)`` pairs of shape ``(batch_size, seq_len)``: windows
    ``tokens[s : s + seq_len]`` and ``tokens[s + 1 : s + seq_len + 1]`` at random starts ``s``."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"RandomWindowSampler: {len(tokens)} tokens are too few for seq_len={seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"RandomWindowSampler: rank={rank} must be in [0, world_size={world_size})")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.world_size * self.batch_size,),
                               generator=self.generator)
        self.draws += 1
        mine = rank_share(starts, rank=self.rank, world_size=self.world_size).numpy()
        windows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in mine])
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.draws = state["draws"]


def evaluation_windows(num_tokens: int, seq_len: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """``(start, first_counted)`` pairs for windows that cover a split's targets once each.

    Windows are contiguous and non-overlapping; the last one is moved back to end at the split's
    end, and ``first_counted`` marks where its new targets begin so no target counts twice. With
    ``max_windows``, that many windows evenly spaced over the split (a fixed, comparable subset).
    """
    if num_tokens < seq_len + 1:
        raise ValueError(f"evaluation_windows: {num_tokens} tokens are too few for seq_len={seq_len}")
    starts = list(range(0, num_tokens - seq_len, seq_len))
    windows = [(s, 0) for s in starts]
    covered = starts[-1] + seq_len  # targets are tokens[1 : covered + 1]
    if covered < num_tokens - 1:
        last = num_tokens - 1 - seq_len
        windows.append((last, covered - last))
    if max_windows is not None and max_windows < len(windows):
        step = len(windows) / max_windows
        windows = [(windows[int(i * step)][0], 0) for i in range(max_windows)]
    return windows
