"""tformer.ops.softmax: every backend against the float64 reference.

Each case runs once per backend (the ``backend`` fixture): the forward and the gradients of
x (and of an additive mask that requires grad) are compared with the reference backend run
in float64 on float64 copies of the same inputs. Masks are given in their broadcastable
shape, as a user would; the op expands them to x's shape as a stride-0 view. The reference
itself is checked against torch.softmax and by gradcheck, in float64.

On the CPU the Triton kernels run under TRITON_INTERPRET=1; rows longer than one block (the
online softmax) are exercised there by calling the launchers with a small ``max_block_n``.
"""

import pytest
import torch

from tformer import ops

from conftest import DEVICE, call_or_skip, requires_backend, requires_cuda
from tolerances import assert_close_to_reference

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
MASKS = ["no_mask", "bool_mask", "additive_mask"]


def make_case(shape, dtype, mask_kind, *, mask_shape=None, magnitude=1.0, fully_masked_rows=(), seed=0):
    """(x, mask): x ``shape`` in ``dtype``; mask of ``mask_shape`` (broadcastable to x; default
    x's shape with the middle dim 1), bool or float32 additive with some ``-inf``. Each index in
    ``fully_masked_rows`` (a leading index into the mask) gets every entry masked out."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * magnitude).to(DEVICE, dtype)
    if mask_kind == "no_mask":
        return x, None
    mask_shape = mask_shape or (shape[0], 1, *shape[2:])
    keep = torch.rand(mask_shape, generator=generator) > 0.3
    for index in fully_masked_rows:
        keep[index] = False
    if mask_kind == "bool_mask":
        return x, keep.to(DEVICE)
    additive = torch.randn(mask_shape, generator=generator).masked_fill(~keep, float("-inf"))
    return x, additive.to(DEVICE)


def run(x, mask, backend, *, scale, dim=-1, mask_grad=False, grad_seed=1):
    """(y, dx, d_mask) of the op on copies of x and mask."""
    x = x.detach().clone().requires_grad_()
    if mask is not None:
        mask = mask.detach().clone().requires_grad_(mask_grad)
    y = call_or_skip(ops.softmax, x, dim, scale=scale, mask=mask, backend=backend)
    generator = torch.Generator().manual_seed(grad_seed)
    dy = torch.randn(y.shape, generator=generator).to(DEVICE, torch.float64)
    (y.double() * dy).sum().backward()
    return y, x.grad, None if mask is None or not mask_grad else mask.grad


def check_against_reference(x, mask, backend, *, scale=0.37, dim=-1, mask_grad=False, grad_scale=1.0, what=""):
    dtype = x.dtype
    y, dx, d_mask = run(x, mask, backend, scale=scale, dim=dim, mask_grad=mask_grad)
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    y64, dx64, d_mask64 = run(x.double(), mask64, "reference", scale=scale, dim=dim, mask_grad=mask_grad)
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}, expected {dtype}"
    assert_close_to_reference(y, y64, dtype, "forward", what=f"{what} y")
    assert_close_to_reference(dx * grad_scale, dx64 * grad_scale, dtype, "grad", what=f"{what} dx")
    if mask_grad:
        assert d_mask is not None and d_mask.shape == mask.shape, f"{what}: d_mask missing or misshapen"
        assert_close_to_reference(d_mask, d_mask64, dtype, "grad", what=f"{what} d_mask")
    return y, dx


# ---- every backend against the float64 reference ---------------------------------------

@pytest.mark.parametrize("n_cols", [1, 17, 1000, 4097], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_matches_reference(backend, mask_kind, dtype, n_cols):
    x, mask = make_case((2, 2, n_cols), dtype, mask_kind)
    if mask is not None and n_cols == 1:
        mask[...] = True if mask.dtype == torch.bool else 0.0  # one column: keep it taking part
    check_against_reference(x, mask, backend, what=f"{mask_kind} N={n_cols}")


@pytest.mark.parametrize("shape", [(0, 2, 5), (2, 2, 0)], ids=["no_rows", "empty_rows"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_empty_inputs(backend, mask_kind, shape):
    # Empty in, empty out (as torch.softmax), gradients of the right shape.
    x, mask = make_case(shape, torch.float32, mask_kind)
    y, dx, _ = run(x, mask, backend, scale=0.5)
    assert y.shape == shape and dx.shape == shape


@pytest.mark.parametrize("scale", [1.0, 0.125, 3.0], ids=lambda s: f"scale{s}")
def test_scale(backend, scale):
    x, mask = make_case((2, 3, 40), torch.float32, "additive_mask")
    check_against_reference(x, mask, backend, scale=scale, what=f"scale={scale}")


@pytest.mark.parametrize("n_cols", [17, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool_mask", "additive_mask"])
def test_fully_masked_rows_give_zeros(backend, mask_kind, dtype, n_cols):
    """A row where nothing takes part returns zeros and zero gradients, never NaN."""
    x, mask = make_case((2, 2, n_cols), dtype, mask_kind, fully_masked_rows=[(1, 0)])
    y, dx = check_against_reference(x, mask, backend, what=f"fully masked {mask_kind}")
    assert torch.all(y[1] == 0) and torch.all(dx[1] == 0), "fully masked rows must give exact zeros"
    assert y[0].sum(-1).sub(1).abs().max() < 1e-2, "rows with unmasked entries must sum to 1"


@pytest.mark.parametrize("dtype", DTYPES)
def test_additive_mask_gradient(backend, dtype):
    """A float mask that requires grad gets d_scores, summed over its broadcast dims."""
    x, mask = make_case((2, 3, 33), dtype, "additive_mask", mask_shape=(1, 3, 33))
    check_against_reference(x, mask, backend, mask_grad=True, what="additive mask grad")


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 24), (1, 3, 5, 1), (2, 3, 5, 24), (24,)],
                         ids=["key_padding", "column_broadcast", "full", "last_dim_only"])
def test_mask_broadcasting(backend, mask_shape):
    x, mask = make_case((2, 3, 5, 24), torch.float32, "bool_mask", mask_shape=mask_shape)
    check_against_reference(x, mask, backend, what=f"mask {mask_shape}")


def test_mask_with_many_leading_dims(backend):
    """Six dims with alternating broadcast cannot collapse to three strided dims: still right."""
    x, mask = make_case((2, 2, 2, 2, 2, 9), torch.float32, "additive_mask", mask_shape=(2, 1, 2, 1, 2, 9))
    check_against_reference(x, mask, backend, what="6-d mask")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["no_mask", "additive_mask"])
def test_large_magnitudes(backend, mask_kind, dtype):
    """Scores of scale 1e4: exp() must see the row max subtracted, or it overflows."""
    x, mask = make_case((2, 2, 300), dtype, mask_kind, magnitude=1e4)
    check_against_reference(x, mask, backend, scale=1.0, what=f"1e4 {mask_kind}")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "dim1"])
def test_non_contiguous_inputs(backend, layout):
    generator = torch.Generator().manual_seed(3)
    if layout == "transposed":
        x = torch.randn(2, 30, 4, generator=generator).to(DEVICE).transpose(1, 2)
    else:
        x = torch.randn(2, 4, 60, generator=generator).to(DEVICE)[..., :30]
    mask = (torch.rand(2, 1, 30, generator=generator) > 0.2).to(DEVICE)
    dim = -1
    if layout == "dim1":
        x, mask, dim = x.transpose(1, 2), mask.transpose(1, 2), 1
    assert not x.is_contiguous()
    check_against_reference(x, mask, backend, dim=dim, what=layout)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=requires_cuda)])
def test_torch_compile_fullgraph(backend, compiler):
    """The op traces into one graph (custom ops with fake implementations): no graph break.
    On the CPU inductor would spend ~45 s compiling C++, so the CPU run uses aot_eager."""
    x, mask = make_case((2, 3, 20), torch.float32, "additive_mask", mask_shape=(1, 3, 20))

    def attention_probs(x, mask, keep):
        return ops.softmax(x, scale=0.5, mask=mask, backend=backend) + ops.softmax(x, mask=keep, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(attention_probs, fullgraph=True, backend=compiler)
    keep = mask > -1
    x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    mask_compiled, mask_eager = mask.clone().requires_grad_(), mask.clone().requires_grad_()
    out = call_or_skip(compiled, x_compiled, mask_compiled, keep)
    expected = attention_probs(x_eager, mask_eager, keep)
    torch.testing.assert_close(out, expected)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)
    torch.testing.assert_close(mask_compiled.grad, mask_eager.grad)


@requires_cuda
@pytest.mark.parametrize("n_cols", [8193, 65536], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_long_rows_gpu(backend, mask_kind, dtype, n_cols):
    x, mask = make_case((4, 8, n_cols), dtype, mask_kind, fully_masked_rows=[(0, 0)])
    check_against_reference(x, mask, backend, what=f"{mask_kind} N={n_cols}")


# ---- Triton: rows longer than one block (the online softmax) on any device ---------------

@requires_backend("triton")
@pytest.mark.parametrize("n_cols,max_block_n", [(1000, 256), (4097, 1024)], ids=["N1000_4chunks", "N4097_5chunks"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_triton_online_softmax(mask_kind, n_cols, max_block_n):
    from tformer.kernels import softmax as kernels

    # Row 0 is masked out in its first chunks only: the running max must stay -inf there,
    # not a stand-in 0 that the later scores (about -150: exp(-150) is 0 in float32) would
    # underflow against.
    x, mask = make_case((3, 1, n_cols), torch.float32, mask_kind, mask_shape=(3, 1, n_cols), magnitude=100.0,
                        fully_masked_rows=[(1,)])
    x[0] = x[0] * 0.01 - 300.0
    if mask is not None:
        mask[0, 0, : n_cols // 2] = False if mask.dtype == torch.bool else float("-inf")
    mask_view = None if mask is None else mask.expand(x.shape)
    y = kernels.softmax_fwd(x, mask_view, 0.5, max_block_n=max_block_n)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    need_mask_grad = mask_kind == "additive_mask"
    dx, d_mask = kernels.softmax_bwd(dy, y, 0.5, need_mask_grad, max_block_n=max_block_n)

    x64 = x.double().requires_grad_()
    mask64 = None if mask is None else mask.double().requires_grad_() if need_mask_grad else mask
    y64 = ops.softmax(x64, scale=0.5, mask=mask64, backend="reference")
    (y64 * dy.double()).sum().backward()
    f32 = torch.float32
    assert_close_to_reference(y, y64, f32, what="y")
    assert_close_to_reference(dx, x64.grad, f32, "grad", what="dx")
    if need_mask_grad:
        assert_close_to_reference(d_mask, mask64.grad, f32, "grad", what="d_mask")
    if mask is not None:
        assert torch.all(y[1] == 0) and torch.all(dx[1] == 0)


# ---- the reference itself, against independent float64 formulas ------------------------

def test_reference_matches_torch_softmax_float64():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 17, generator=generator, dtype=torch.float64)
    keep = torch.rand(3, 1, 17, generator=generator) > 0.3
    keep[..., 0] = True
    torch.testing.assert_close(ops.softmax(x, scale=0.3, backend="reference"), torch.softmax(x * 0.3, -1),
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ops.softmax(x, dim=1, backend="reference"), torch.softmax(x, 1), atol=1e-12, rtol=1e-12)
    expected = torch.softmax((x * 0.3).masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(ops.softmax(x, scale=0.3, mask=keep, backend="reference"), expected,
                               atol=1e-12, rtol=1e-12)
    additive = torch.randn(3, 1, 17, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(ops.softmax(x, scale=0.3, mask=additive, backend="reference"),
                               torch.softmax(x * 0.3 + additive, -1), atol=1e-12, rtol=1e-12)


def test_reference_gradcheck_float64():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    additive = torch.randn(1, 3, 7, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m: ops.softmax(x, scale=0.7, mask=m, backend="reference"),
                                    (x, additive))
