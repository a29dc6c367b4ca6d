"""Softmax through ``torch.softmax``, with tformer's rule for rows where nothing takes part."""

import torch

from tformer.ops.registry import register

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALL_DEVICES = ("cpu", "cuda")


def empty_rows_to_zero(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with all -inf rows set to 0, bool (..., 1) marking those rows).

    torch.softmax of an all -inf row is NaN and so is its gradient. Softmax of the zeroed row
    is finite; the caller zeroes its probabilities with the mask, which also zeroes the
    gradient flowing back into it, as the reference does."""
    empty = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    return scores.masked_fill(empty, 0.0), empty


@register("softmax", "torch", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def softmax(x: torch.Tensor, *, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    if x.shape[-1] == 0:
        return x * scale
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scores = x.to(compute) * scale if scale != 1.0 else x.to(compute)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
    scores, empty = empty_rows_to_zero(scores)
    return torch.softmax(scores, dim=-1).masked_fill(empty, 0.0).to(x.dtype)
