"""Triton attention: registration of the kernels in tformer.kernels.attention (not written yet)."""
