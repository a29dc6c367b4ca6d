"""Drop-in paths that plug tformer's kernels into other libraries.

- :mod:`.patch`: ``tformer.patch(model)`` swaps torch's own attention and LayerNorm modules
  for tformer's, in place.
- ``import tformer.integrations.transformers`` registers the ``"tformer"`` attention
  implementation with Hugging Face transformers (an optional dependency: the
  ``tformer[transformers]`` extra).

``import tformer`` loads only :mod:`.patch` (for ``tformer.patch``).
"""
