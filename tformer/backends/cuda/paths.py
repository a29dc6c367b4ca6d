"""Which kernels a CUDA attention call asks for, worked out in Python from the call's band,
soft-cap and the registry's ``force_sm80*`` options: the arguments the compiled ops take. Apart
from the extension, so the choice is tested where the extension does not load."""

from __future__ import annotations

from tformer.ops.attention_mask import Band


def kernel_band(band, same_lengths: bool = False) -> tuple[int, int, bool]:
    """The kernels' (window_left, window_right, bottom_right); the band already folds causal in.
    With equal query and key lengths both alignments are the same band: passed as top-left, so
    FlashAttention-style causal calls with Sq == Sk keep the Hopper kernels' unbanded variants."""
    band = Band() if band is None else band
    return band.left, band.right, band.bottom_right and not same_lengths


def takes_banded_kernels(band_args: tuple[int, int, bool], softcap: float) -> bool:
    """Whether a call takes the sm_90a kernels' banded variants: the same rule as
    ``attention_has_band_or_softcap`` in csrc/attention/attention.h (plain causal is not banded)."""
    left, right, bottom_right = band_args
    return left >= 0 or (right >= 0 and (right > 0 or bottom_right)) or softcap > 0.0


def sm80_flags(force_sm80: bool, force_sm80_backward: bool, force_sm80_banded: bool = False,
           banded: bool = False) -> tuple[bool, bool]:
    """The ops' (force_sm80, force_sm80_backward): forcing both passes forces the backward;
    ``force_sm80_banded`` forces both for banded calls only."""
    force_sm80 = bool(force_sm80 or (force_sm80_banded and banded))
    return force_sm80, bool(force_sm80 or force_sm80_backward)
