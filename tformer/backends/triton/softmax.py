"""Triton softmax: registration of the kernels in tformer.kernels.softmax (not written yet)."""
