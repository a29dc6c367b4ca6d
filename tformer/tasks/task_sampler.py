"""Which task the next training batch comes from: round-robin, proportional to data set size,
or temperature-scaled sampling (p_t proportional to n_t^(1/T): T = 1 is proportional, larger T
flattens toward uniform; Arivazhagan et al. 2019 use T = 5 for massively multilingual MT).

The generator is seeded by the run's seed alone (not the rank): every rank draws the same
task for the same micro-batch, so data-parallel ranks always run the same head.
"""

from __future__ import annotations

import torch

SCHEDULES = ("round_robin", "proportional", "temperature")


class TaskSampler:
    """Args:
        names: the tasks, in a fixed order.
        sizes: training examples per task (the proportional and temperature weights).
        schedule: one of :data:`SCHEDULES`.
        temperature: ``T`` for ``schedule="temperature"`` (> 0).
        seed: the generator's seed.
    """

    def __init__(self, names: list[str], sizes: list[int], *, schedule: str = "round_robin",
                 temperature: float = 2.0, seed: int = 0):
        if schedule not in SCHEDULES:
            raise ValueError(f"TaskSampler: argument 'schedule' must be one of {SCHEDULES}, got {schedule!r}")
        if not names or len(names) != len(sizes):
            raise ValueError(f"TaskSampler: 'names' ({len(names)}) and 'sizes' ({len(sizes)}) must be non-empty and "
                             f"of equal length")
        if min(sizes) < 1:
            raise ValueError(f"TaskSampler: every task needs training examples, got sizes {dict(zip(names, sizes))}")
        if not temperature > 0:
            raise ValueError(f"TaskSampler: argument 'temperature' must be > 0, got {temperature}")
        self.names, self.schedule = list(names), schedule
        exponent = 1.0 / temperature if schedule == "temperature" else 1.0
        weights = torch.tensor(sizes, dtype=torch.float64) ** exponent
        self.probabilities = weights / weights.sum()
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def next(self) -> str:
        """The next task's name."""
        if self.schedule == "round_robin":
            name = self.names[self.draws % len(self.names)]
        else:
            index = torch.multinomial(self.probabilities, 1, generator=self.generator).item()
            name = self.names[index]
        self.draws += 1
        return name

    def state_dict(self) -> dict:
        return {"draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        self.generator.set_state(state["generator"])
