"""tformer's Triton kernels, one module per op. Installed as ``tformer.kernels``."""
