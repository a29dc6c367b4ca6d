"""``MultiTaskLoss``: per-task loss weights, fixed from the config or learned as task
uncertainties (Kendall, Gal and Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics").

The learned weights are parameters, so the module lives inside the model (the optimizer,
DeepSpeed and FSDP2 see them like any other weight; they are 1-D, so no weight decay).
"""

from __future__ import annotations

import torch
from torch import nn

# Kendall et al. eq. 7 and 10 with s = log(sigma^2) (the stable parameterisation of sec. 3.2):
# a Gaussian likelihood (regression) gives 1/(2 sigma^2) L + log sigma = 0.5 exp(-s) L + 0.5 s,
# a softmax likelihood (classification) 1/sigma^2 L + log sigma = exp(-s) L + 0.5 s.
LIKELIHOOD_SCALE = {"classification": 1.0, "token_classification": 1.0, "regression": 0.5}


class MultiTaskLoss(nn.Module):
    """Weights one task's mean loss into the total.

    Args:
        kinds: task name -> head kind (``classification``, ``token_classification``, ``regression``).
        weights: task name -> fixed weight ``w_t`` (multiplies the whole term).
        uncertainty: learn ``s_t = log sigma_t^2`` per task (initialised at 0, i.e. sigma = 1).

    ``forward(task, loss)`` returns ``w_t * L_t`` or, with ``uncertainty``,
    ``w_t * (c_t exp(-s_t) L_t + 0.5 s_t)`` with ``c_t`` 1 for classification, 0.5 for regression.
    """

    def __init__(self, kinds: dict[str, str], weights: dict[str, float], *, uncertainty: bool = False):
        super().__init__()
        if set(kinds) != set(weights):
            raise ValueError(f"MultiTaskLoss: 'kinds' names {sorted(kinds)} but 'weights' names {sorted(weights)}")
        for name, kind in kinds.items():
            if kind not in LIKELIHOOD_SCALE:
                raise ValueError(f"MultiTaskLoss: task {name!r} has kind {kind!r}, expected one of "
                                 f"{sorted(LIKELIHOOD_SCALE)}")
        self.names = list(kinds)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.register_buffer("weights", torch.tensor([float(weights[n]) for n in self.names]), persistent=False)
        self.register_buffer("scales", torch.tensor([LIKELIHOOD_SCALE[kinds[n]] for n in self.names]),
                             persistent=False)
        self.uncertainty = uncertainty
        self.log_vars = nn.Parameter(torch.zeros(len(self.names))) if uncertainty else None

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        """task: a task name; loss: that task's scalar mean loss -> the weighted scalar term."""
        if task not in self.index:
            raise ValueError(f"MultiTaskLoss: unknown task {task!r}, expected one of {self.names}")
        i = self.index[task]
        if self.log_vars is None:
            return self.weights[i] * loss
        log_var = self.log_vars[i].float()
        return self.weights[i] * (self.scales[i] * torch.exp(-log_var) * loss + 0.5 * log_var)

    @torch.no_grad()
    def effective_weight(self, task: str) -> torch.Tensor:
        """The factor on ``task``'s mean loss now (a detached scalar on the parameters' device)."""
        i = self.index[task]
        if self.log_vars is None:
            return self.weights[i].clone()
        return self.weights[i] * self.scales[i] * torch.exp(-self.log_vars.detach()[i].float())

    @torch.no_grad()
    def effective_weights(self) -> dict[str, float]:
        """What each task's mean loss is multiplied by now: ``w_t`` or ``w_t c_t exp(-s_t)``."""
        if self.log_vars is None:
            return {name: self.weights[i].item() for name, i in self.index.items()}
        factors = self.weights.cpu() * self.scales.cpu() * torch.exp(-self.log_vars.detach().float().cpu())
        return {name: factors[i].item() for name, i in self.index.items()}
