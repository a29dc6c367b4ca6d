"""The CUDA C++ extension tformer._C: op registration and schemas, the Python autograd and
fake implementations (traced on meta tensors, so this runs without a GPU), the "cuda"
backend's availability reason, and, on a GPU, what is specific to the C++ ops (argument
errors, unaligned inputs, strided masks, deterministic weight gradients). Numerical
correctness of the kernels is tested against the reference in tests/test_layer_norm.py and
tests/test_softmax.py, parametrized over backends."""

import importlib
import inspect

import pytest
import torch

import tformer
from tformer.backends import cuda as cuda_backend
from tformer.ops import registry

from conftest import ON_GPU, requires_cuda

pytestmark = pytest.mark.skipif(cuda_backend.extension_error() is not None,
                                reason=f"tformer._C is not built: {cuda_backend.extension_error()}")

EXPECTED_SCHEMAS = {
    "cuda_layer_norm_fwd": "tformer::cuda_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
                           "float eps) -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)",
    "cuda_layer_norm_bwd": "tformer::cuda_layer_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor input, "
                           "Tensor? weight, Tensor mean, Tensor rstd, bool weight_grad, bool bias_grad) "
                           "-> (Tensor dx, Tensor dweight, Tensor dbias)",
    "cuda_rms_norm_fwd": "tformer::cuda_rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps) "
                         "-> (Tensor y, Tensor residual_out, Tensor rstd)",
    "cuda_rms_norm_bwd": "tformer::cuda_rms_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor input, Tensor? weight, "
                         "Tensor rstd, bool weight_grad) -> (Tensor dx, Tensor dweight)",
    "cuda_softmax_fwd": "tformer::cuda_softmax_fwd(Tensor x, float scale, Tensor? mask) -> Tensor",
    "cuda_softmax_bwd": "tformer::cuda_softmax_bwd(Tensor dy, Tensor y, float scale) -> Tensor",
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(scope="module")
def cuda_ops():
    """The backend's op modules, imported directly: on a machine without a GPU the registry
    never loads them, but their autograd and fake registrations work on meta tensors."""
    return {name: importlib.import_module(f"tformer.backends.cuda.{name}") for name in cuda_backend.OP_MODULES}


@pytest.mark.parametrize("op", sorted(EXPECTED_SCHEMAS))
def test_op_is_registered_with_schema_and_cuda_kernel(op):
    overload = getattr(torch.ops.tformer, op).default
    assert str(overload._schema) == EXPECTED_SCHEMAS[op]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tformer::{op}", "CUDA")


@pytest.mark.parametrize("op", sorted(EXPECTED_SCHEMAS))
def test_op_has_fake_implementation(cuda_ops, op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tformer::{op}", "Meta")


def test_public_functions_are_registered_with_reference_signatures(cuda_ops):
    reference = {name: importlib.import_module(f"tformer.backends.reference.{name}")
                 for name in ("layer_norm", "softmax")}
    for op, module in (("layer_norm", "layer_norm"), ("rms_norm", "layer_norm"), ("softmax", "softmax")):
        impl = registry._backends["cuda"].impls[op]
        assert impl.devices == frozenset({"cuda"})
        assert impl.dtypes == frozenset(DTYPES)
        expected = inspect.signature(getattr(reference[module], op)).parameters
        actual = inspect.signature(impl.fn).parameters
        assert [(p.name, p.kind) for p in actual.values()] == [(p.name, p.kind) for p in expected.values()], op


@pytest.mark.skipif(ON_GPU, reason="checks the reason given when no GPU is visible")
def test_cuda_backend_reason_without_gpu():
    reason = tformer.available_backends()["cuda"]
    assert reason is not None and reason.startswith("no CUDA GPU is visible"), reason
    with pytest.raises(tformer.BackendError, match="no CUDA GPU is visible"):
        tformer.ops.layer_norm(torch.ones(2, 4), backend="cuda")


def _meta(shape, dtype, requires_grad=True):
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("param_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_autograd_shapes_and_dtypes(cuda_ops, dtype, param_dtype, with_residual):
    param_dtype = dtype if param_dtype == "same" else param_dtype
    x, residual = _meta((2, 3, 5), dtype), _meta((2, 3, 5), dtype) if with_residual else None
    weight, bias = _meta((5,), param_dtype), _meta((5,), param_dtype)
    out = cuda_ops["layer_norm"].layer_norm(x, weight, bias, eps=1e-5, residual=residual)
    y, residual_out = out if with_residual else (out, None)
    assert y.shape == x.shape and y.dtype == dtype
    loss = y.float().sum() + (residual_out.float().sum() if with_residual else 0)
    leaves = [t for t in (x, weight, bias, residual) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_autograd_shapes_and_dtypes(cuda_ops, with_weight, with_residual):
    x = _meta((4, 7), torch.bfloat16)
    weight = _meta((7,), torch.bfloat16) if with_weight else None
    residual = _meta((4, 7), torch.bfloat16) if with_residual else None
    out = cuda_ops["layer_norm"].rms_norm(x, weight, eps=1e-6, residual=residual)
    y = out[0] if with_residual else out
    leaves = [t for t in (x, weight, residual) if t is not None]
    grads = torch.autograd.grad(y.float().sum(), leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype


def test_softmax_float64_mask_is_converted_without_materializing_broadcast(cuda_ops):
    compact = torch.randn(2, 1, 5, dtype=torch.float64)
    mask = compact.expand(2, 3, 5)
    kernel_mask = cuda_ops["softmax"]._kernel_mask(mask)
    assert kernel_mask.dtype == torch.float32 and kernel_mask.stride(1) == 0
    torch.testing.assert_close(kernel_mask, mask.float())
    bool_mask = torch.ones(2, 1, 5, dtype=torch.bool).expand(2, 3, 5)
    assert cuda_ops["softmax"]._kernel_mask(bool_mask) is bool_mask


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64])
def test_softmax_additive_mask_gets_gradient_at_its_own_shape(cuda_ops, mask_dtype):
    x = _meta((2, 3, 5), torch.float16)
    compact_mask = _meta((2, 1, 5), mask_dtype)
    y = cuda_ops["softmax"].softmax(x, scale=0.5, mask=compact_mask.expand(2, 3, 5))
    dx, dmask = torch.autograd.grad(y.float().sum(), (x, compact_mask))
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dmask.shape == compact_mask.shape and dmask.dtype == mask_dtype


def test_fwd_and_bwd_ops_trace_into_one_graph(cuda_ops):
    """The fake implementations let make_fx trace forward and backward (what torch.compile's
    AOTAutograd does): both custom ops of each kernel appear in the graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, weight, bias, residual, mask):
        y, residual_out = cuda_ops["layer_norm"].layer_norm(x, weight, bias, eps=1e-5, residual=residual)
        probs = cuda_ops["softmax"].softmax(y, scale=0.5, mask=mask)
        return torch.autograd.grad(probs.float().sum() + residual_out.float().sum(), (x, weight, bias, residual))

    x, residual = _meta((2, 3, 8), torch.bfloat16), _meta((2, 3, 8), torch.bfloat16)
    weight, bias = _meta((8,), torch.float32), _meta((8,), torch.float32)
    mask = torch.ones(2, 1, 8, device="meta", dtype=torch.bool).expand(2, 3, 8)
    graph = make_fx(step, tracing_mode="fake")(x, weight, bias, residual, mask)
    targets = {str(node.target) for node in graph.graph.nodes}
    for op in ("cuda_layer_norm_fwd", "cuda_layer_norm_bwd", "cuda_softmax_fwd", "cuda_softmax_bwd"):
        assert f"tformer.{op}.default" in targets


def test_torch_compile_fullgraph(cuda_ops):
    def loss(x, weight, mask):
        y = cuda_ops["layer_norm"].rms_norm(x, weight, eps=1e-6, residual=None)
        return cuda_ops["softmax"].softmax(y, scale=0.5, mask=mask).float().sum()

    x, weight = _meta((2, 3, 8), torch.float16), _meta((8,), torch.float16)
    mask = torch.zeros(2, 1, 8, device="meta").expand(2, 3, 8)
    torch._dynamo.reset()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(x, weight, mask).backward()
    assert x.grad.shape == x.shape and weight.grad.dtype == torch.float16


# ---- GPU only: behaviour of the C++ side itself -------------------------------------------------

@requires_cuda
def test_cpp_checks_name_the_argument():
    x = torch.randn(4, 8, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="argument 'weight' has dtype Half, expected Float"):
        torch.ops.tformer.cuda_layer_norm_fwd(x, x[0], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="argument 'x' must be contiguous"):
        torch.ops.tformer.cuda_softmax_fwd(x.t(), 1.0, None)
    with pytest.raises(RuntimeError, match="argument 'x' has dtype Double"):
        torch.ops.tformer.cuda_softmax_fwd(x.double(), 1.0, None)
    with pytest.raises(RuntimeError, match="argument 'residual' has dtype Float"):
        torch.ops.tformer.cuda_rms_norm_fwd(x, None, x.float(), 1e-5)


@requires_cuda
@pytest.mark.parametrize("n", [7, 1000, 3001])
def test_unaligned_rows_and_strided_mask(n):
    """x[1:] of odd-length rows starts off a 16-byte boundary; the mask is broadcast over two
    non-adjacent dims (stride 0) and transposed in its last two dims."""
    base = torch.randn(2 * 3 * 4 + 1, n, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 3, 4, n)
    mask = (torch.rand(1, 3, n, 4, device="cuda") > 0.3).transpose(-1, -2).expand(2, 3, 4, n)
    out = tformer.ops.softmax(x, scale=0.7, mask=mask, backend="cuda")
    expected = tformer.ops.softmax(x.double(), scale=0.7, mask=mask, backend="reference")
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
    y = tformer.ops.layer_norm(x, eps=1e-5, backend="cuda")
    torch.testing.assert_close(y.double(), tformer.ops.layer_norm(x.double(), eps=1e-5, backend="reference"),
                               atol=4e-3, rtol=4e-3)


@requires_cuda
def test_weight_gradients_are_deterministic():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1024, device="cuda", requires_grad=True)
    bias = torch.randn(1024, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(2):
        y = tformer.ops.layer_norm(x, weight, bias, backend="cuda")
        grads.append(torch.autograd.grad(y, (weight, bias), dy))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
