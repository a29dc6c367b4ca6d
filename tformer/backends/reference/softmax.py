"""Reference softmax: the masked, fully-masked-safe softmax that attention also uses."""

import torch

from tformer.ops.registry import register

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALL_DEVICES = ("cpu", "cuda")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the ground truth); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of scores that may hold -inf, and its log-sum-exp.

    A row that is all -inf would give exp(-inf - -inf) = NaN in the textbook formula; here its
    max is taken as 0 and its denominator as 1, so its probabilities are 0 and so are its
    gradients. Its log-sum-exp is log(0) = -inf. Subtracting the (detached) row max changes
    no value, only keeps exp() in range.
    """
    if scores.shape[-1] == 0:  # no entries at all (e.g. Sk = 0): nothing takes part
        return scores, scores.detach().new_full(scores.shape[:-1], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(denom == 0, torch.ones_like(denom), denom)
    with torch.no_grad():
        lse = (torch.log(denom) + row_max).squeeze(-1)
    return probs, lse


def apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """bool mask: True takes part, False becomes -inf; float mask: added."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.to(scores.dtype)


@register("softmax", "reference", devices=ALL_DEVICES, dtypes=ALL_DTYPES)
def softmax(x: torch.Tensor, *, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = apply_mask(x.to(compute_dtype(x.dtype)) * scale, mask)
    probs, _ = safe_softmax(scores)
    return probs.to(x.dtype)
