"""Shared test setup: device choice, backend parametrization, Triton on the CPU."""

import os

import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. This must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tformer  # noqa: E402
from tformer.optional import MissingDependency  # noqa: E402

# Under pytest -n N the workers share the cores: give each its share of torch's threads instead
# of letting every worker start one thread per core.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def backend_params(include_reference: bool = True, variants_of: str | None = None):
    """Every tformer backend as a pytest param; one that cannot run here is skipped with its reason.
    ``variants_of``: also the variants (``triton:atomic_dq``) that change that op."""
    from tformer.ops import registry
    from tformer.ops.variants import split

    params = []
    for name, reason in tformer.available_backends().items():
        if name == "reference" and not include_reference:
            continue
        base, variant = split(name)
        if variant is not None and (variants_of is None or variants_of not in registry.variants(base)[variant].ops):
            continue
        marks = [pytest.mark.skip(reason=f"backend {name!r} is not available: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def requires_backend(name: str):
    """Skips, with the registry's reason, unless backend ``name`` can run here."""
    reason = tformer.available_backends()[name]
    return pytest.mark.skipif(reason is not None, reason=f"backend {name!r} is not available: {reason}")


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    return request.param


def call_or_skip(fn, *args, **kwargs):
    """Run an op; a backend that does not take this input (an op, dtype or feature it lacks)
    is skipped with the registry's reason. Any other error fails the test."""
    try:
        return fn(*args, **kwargs)
    except tformer.ops.UnsupportedInput as error:
        pytest.skip(str(error))


def _skip_on_missing_extra():
    """A test that reaches a feature whose extra is not installed here (MissingDependency, which
    names the extra) is skipped with that message, in its setup or its body. CI cannot skip this
    way: .ci/run installs every extra and checks that each optional dependency imports."""
    try:
        return (yield)
    except MissingDependency as error:
        pytest.skip(f"optional dependency missing: {error}")


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_skip_on_missing_extra)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_skip_on_missing_extra)
