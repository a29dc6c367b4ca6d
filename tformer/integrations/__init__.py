"""Drop-in paths that plug tformer's kernels into other libraries.

- ``import tformer.integrations.transformers`` registers the ``"tformer"`` attention
  implementation with Hugging Face transformers (an optional dependency: the
  ``tformer[transformers]`` extra).

Nothing here is imported by ``import tformer``.
"""
