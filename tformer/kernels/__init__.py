"""tformer's Triton kernels, one module per op (``tformer.kernels.attention``, ...).

The modules live in the repository's top-level ``kernels/`` folder, which has no ``__init__.py``
on purpose: run from the project root, ``import kernels`` must find the installed package of that
name (Hugging Face's ``kernels``, which transformers imports), never this project's folder. So
this package is the one name they are imported by. A wheel carries the modules beside this file
(setup.py copies them in); in a checkout, the folder is added to this package's search path.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
_checkout = _here.parent.parent
# Only a source checkout: in a wheel the modules sit beside this file, and the folder two levels
# up is site-packages, whose kernels/ is somebody else's package.
if not (_here / "attention.py").exists() and (_checkout / "setup.py").is_file():
    __path__.append(str(_checkout / "kernels"))  # noqa: F821 (a package's __path__ is a module global)
