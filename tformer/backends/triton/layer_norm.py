"""Triton layer_norm: registration of the kernels in tformer.kernels.layer_norm (not written yet)."""
