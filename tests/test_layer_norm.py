"""tformer.ops.layer_norm and rms_norm: every backend against the float64 reference.

Each case runs once per backend (the ``backend`` fixture): the forward and every input
gradient (x, weight, bias, residual) are compared with the reference backend run in float64
on float64 copies of the same (already rounded) inputs. The reference itself is checked
against torch.nn.functional.layer_norm and an RMSNorm formula, and by gradcheck, in float64.

On the CPU the Triton kernels run under TRITON_INTERPRET=1; rows wider than one block are
exercised there by calling the launchers with a small ``max_block_n``; on a GPU the op-level
cases with N = 65536 take the chunked path by themselves.
"""

import pytest
import torch
import torch.nn.functional as F

from tformer import ops

from conftest import DEVICE, call_or_skip, requires_backend, requires_cuda
from tolerances import assert_close_to_reference

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
NORMS = ["layer_norm", "rms_norm"]


def make_case(rows, n_cols, dtype, *, weight=True, bias=True, residual=False, magnitude=1.0, seed=0):
    """Inputs as a dict of leaf tensors on DEVICE in ``dtype`` (weight/bias may be None)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=generator) * scale + offset).to(device=DEVICE, dtype=dtype)

    return dict(
        # A mean offset as large as the spread: cancellation in a one-pass variance would show.
        x=randn(rows, n_cols, scale=magnitude, offset=magnitude),
        weight=randn(n_cols) if weight else None,
        bias=randn(n_cols) if bias else None,
        residual=randn(rows, n_cols, scale=magnitude) if residual else None,
    )


def norm_case(norm, rows, n_cols, dtype, **kwargs):
    """:func:`make_case` for ``norm``: RMSNorm takes no bias."""
    return make_case(rows, n_cols, dtype, bias=norm == "layer_norm", **kwargs)


def call_norm(norm, tensors, **kwargs):
    """ops.layer_norm or ops.rms_norm on a :func:`make_case` dict (RMSNorm ignores its bias)."""
    if norm == "layer_norm":
        return ops.layer_norm(tensors["x"], tensors["weight"], tensors["bias"], residual=tensors["residual"],
                              **kwargs)
    return ops.rms_norm(tensors["x"], tensors["weight"], residual=tensors["residual"], **kwargs)


def run(norm, inputs, backend, grad_seed=1, eps=1e-5):
    """(outputs, grads) of ``norm`` on copies of ``inputs`` (grads keyed like inputs).

    With a residual the loss also uses residual_out, so d(residual_out) flows in from a
    "later use" and must be added to the gradients of x and residual.
    """
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = call_or_skip(call_norm, norm, leaves, eps=eps, backend=backend)
    outputs = out if isinstance(out, tuple) else (out,)
    generator = torch.Generator().manual_seed(grad_seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=generator).to(DEVICE, torch.float64)).sum()
               for o in outputs)
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return outputs, grads


def as_float64(inputs):
    return {k: None if v is None else v.double() for k, v in inputs.items()}


def check_against_reference(norm, inputs, backend, dtype, grad_scale=1.0, what=""):
    outputs, grads = run(norm, inputs, backend)
    expected_outputs, expected_grads = run(norm, as_float64(inputs), "reference")
    for name, actual, expected in zip(("y", "residual_out"), outputs, expected_outputs):
        assert actual.dtype == dtype, f"{what} {name}: dtype {actual.dtype}, expected {dtype}"
        assert_close_to_reference(actual, expected, dtype, "forward", what=f"{what} {name}")
    for name, expected in expected_grads.items():
        actual = grads[name]
        assert actual is not None, f"{what}: no gradient for {name}"
        assert actual.dtype == inputs[name].dtype, f"{what} d{name}: dtype {actual.dtype}"
        # dx scales as 1/std of the row: compare it in units of that scale.
        scale = grad_scale if name in ("x", "residual") else 1.0
        assert_close_to_reference(actual * scale, expected * scale, dtype, "grad", what=f"{what} d{name}")


# ---- every backend against the float64 reference ---------------------------------------

@pytest.mark.parametrize("n_cols", [1, 17, 1000, 4097], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_reference(backend, norm, dtype, n_cols):
    inputs = norm_case(norm, 3, n_cols, dtype)
    check_against_reference(norm, inputs, backend, dtype, what=f"{norm} N={n_cols}")


@pytest.mark.parametrize("n_cols", [17, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_fused_residual(backend, norm, dtype, n_cols):
    inputs = norm_case(norm, 3, n_cols, dtype, residual=True)
    check_against_reference(norm, inputs, backend, dtype, what=f"{norm}+residual N={n_cols}")


@pytest.mark.parametrize("rows, n_cols", [(0, 8), (3, 0)], ids=["no_rows", "empty_rows"])
@pytest.mark.parametrize("norm", NORMS)
def test_empty_inputs(backend, norm, rows, n_cols):
    # Empty in, empty out (as torch.nn.functional.layer_norm), gradients of the right shapes.
    outputs, grads = run(norm, norm_case(norm, rows, n_cols, torch.float32, residual=True), backend)
    assert [tuple(o.shape) for o in outputs] == [(rows, n_cols)] * 2
    assert {name: tuple(g.shape) for name, g in grads.items()} == {
        "x": (rows, n_cols), "residual": (rows, n_cols), "weight": (n_cols,),
        **({"bias": (n_cols,)} if norm == "layer_norm" else {})}


@pytest.mark.parametrize("affine", ["weight_bias", "weight_only", "bias_only", "neither"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_weight_and_bias_optional(backend, affine, residual):
    inputs = make_case(4, 33, torch.float32, weight="weight" in affine,
                       bias="bias" in affine, residual=residual)
    check_against_reference("layer_norm", inputs, backend, torch.float32, what=f"layer_norm {affine}")
    if inputs["bias"] is None:
        check_against_reference("rms_norm", inputs, backend, torch.float32, what=f"rms_norm {affine}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_large_magnitudes(backend, norm, dtype):
    """Inputs of scale 1e4 with a 1e4 mean offset: y is O(1) and dx is O(1e-4)."""
    magnitude = 1e4
    # No residual in float16: x + residual could pass float16's 65504.
    inputs = norm_case(norm, 3, 1000, dtype, residual=dtype != torch.float16, magnitude=magnitude)
    check_against_reference(norm, inputs, backend, dtype, grad_scale=magnitude, what=f"{norm} 1e4")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_weight"])
def test_non_contiguous_inputs(backend, layout):
    generator = torch.Generator().manual_seed(3)
    rows, n_cols = 5, 40
    if layout == "transposed":
        x = torch.randn(n_cols, rows, generator=generator).to(DEVICE).t()
    else:
        x = torch.randn(rows, 2 * n_cols, generator=generator).to(DEVICE)[:, :n_cols]
    weight = torch.randn(2 * n_cols, generator=generator).to(DEVICE)
    weight = weight[::2] if layout == "strided_weight" else weight[:n_cols]
    assert not x.is_contiguous() or not weight.is_contiguous()
    inputs = dict(x=x, weight=weight, bias=torch.randn(n_cols, generator=generator).to(DEVICE), residual=None)
    check_against_reference("layer_norm", inputs, backend, torch.float32, what=f"layer_norm {layout}")


@pytest.mark.parametrize("norm", NORMS)
def test_weight_grads_deterministic(backend, norm):
    """dweight/dbias are bitwise the same run to run (two-stage reduction, no atomics)."""
    inputs = norm_case(norm, 13, 300, torch.float32, residual=True)
    _, first = run(norm, inputs, backend)
    _, second = run(norm, inputs, backend)
    for name in ("weight", "bias", "x"):
        if name in first:
            assert torch.equal(first[name], second[name]), f"d{name} differs between two identical runs"


def test_fp32_params_beside_half_x(backend):
    """Autocast style: float32 weight/bias with bf16 x; y in bf16, dweight/dbias in float32."""
    inputs = make_case(3, 64, torch.bfloat16, residual=True)
    inputs["weight"], inputs["bias"] = inputs["weight"].float(), inputs["bias"].float()
    outputs, grads = run("layer_norm", inputs, backend)
    assert outputs[0].dtype == torch.bfloat16 and grads["weight"].dtype == torch.float32
    assert grads["bias"].dtype == torch.float32
    check_against_reference("layer_norm", inputs, backend, torch.bfloat16, what="layer_norm fp32 params")


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=requires_cuda)])
def test_torch_compile_fullgraph(backend, compiler):
    """The ops trace into one graph (custom ops with fake implementations): no graph break.
    On the CPU inductor would spend ~45 s compiling C++, so the CPU run uses aot_eager."""
    inputs = make_case(3, 24, torch.float32, residual=True)

    def block(x, weight, bias, residual):
        y, residual_out = ops.layer_norm(x, weight, bias, residual=residual, backend=backend)
        return ops.rms_norm(y, weight, backend=backend) * 2 + residual_out

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    eager_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = call_or_skip(compiled, **leaves)
    expected = block(**eager_leaves)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, eager_leaves[name].grad, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("n_cols", [1, 17, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])  # float32, bfloat16
@pytest.mark.parametrize("norm", NORMS)
def test_weight_grads_from_several_partials(backend, norm, dtype, n_cols):
    """37 rows over several backward programs (4 under the interpreter), unevenly: dweight and
    dbias add several partial rows, each summed over that program's rows."""
    inputs = norm_case(norm, 37, n_cols, dtype, residual=True)
    check_against_reference(norm, inputs, backend, dtype, what=f"{norm} 37x{n_cols}")


# Rows: a grid-stride loop in every block (more row teams than the fused CUDA backward's
# 2 blocks per SM x 8 warps) and hundreds of partial rows. Widths: a warp per row (scalar and
# vector paths), a block per row with 8, 16 and 32 columns per thread, and one past the fused
# kernel's 8192 (the two-kernel path).
@requires_cuda
@pytest.mark.parametrize("rows,n_cols", [(4099, 1), (4099, 17), (4099, 1000), (2113, 2048), (1031, 4096),
                                         (1031, 8192), (517, 8200)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_many_row_blocks_gpu(backend, norm, dtype, rows, n_cols):
    inputs = norm_case(norm, rows, n_cols, dtype, residual=True)
    check_against_reference(norm, inputs, backend, dtype, what=f"{norm} {rows}x{n_cols}")
    _, first = run(norm, inputs, backend)
    _, second = run(norm, inputs, backend)
    for name in ("weight", "bias"):
        if name in first:
            assert torch.equal(first[name], second[name]), f"d{name} differs between two identical runs"


@requires_cuda
@pytest.mark.parametrize("n_cols", [8193, 65536], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_wide_rows_gpu(backend, norm, dtype, n_cols):
    inputs = norm_case(norm, 64, n_cols, dtype, residual=True)
    check_against_reference(norm, inputs, backend, dtype, what=f"{norm} N={n_cols}")


# ---- Triton: rows wider than one block (the chunked loop) on any device -------------------

@requires_backend("triton")
@pytest.mark.parametrize("n_cols,max_block_n", [(1000, 256), (4097, 1024)], ids=["N1000_4chunks", "N4097_5chunks"])
@pytest.mark.parametrize("norm", NORMS)
def test_triton_chunked_rows(norm, n_cols, max_block_n):
    from tformer.kernels import layer_norm as kernels

    is_rms = norm == "rms_norm"
    inputs = norm_case(norm, 2, n_cols, torch.float32, residual=True, magnitude=100.0)
    x, weight, bias, residual = inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"]
    y, residual_out, mean, rstd = kernels.layer_norm_fwd(x, weight, bias, residual, 1e-5, is_rms=is_rms,
                                                         max_block_n=max_block_n)
    generator = torch.Generator().manual_seed(1)
    dy, d_residual_out = (torch.randn(x.shape, generator=generator).to(DEVICE) for _ in range(2))
    dx, d_residual, dweight, dbias = kernels.layer_norm_bwd(dy, residual_out, weight, bias, mean, rstd,
                                                            d_residual_out, True, is_rms=is_rms,
                                                            max_block_n=max_block_n)

    leaves = {k: None if v is None else v.double().requires_grad_() for k, v in inputs.items()}
    y64, residual_out64 = call_norm(norm, leaves, eps=1e-5, backend="reference")
    ((y64 * dy.double()).sum() + (residual_out64 * d_residual_out.double()).sum()).backward()
    f32 = torch.float32
    assert_close_to_reference(y, y64, f32, what="y")
    assert_close_to_reference(residual_out, residual_out64, f32, what="residual_out")
    assert_close_to_reference(dx * 100, leaves["x"].grad * 100, f32, "grad", what="dx")
    assert torch.equal(dx, d_residual), "d_residual must equal dx (residual_out = x + residual)"
    assert_close_to_reference(dweight, leaves["weight"].grad, f32, "grad", what="dweight")
    if not is_rms:
        assert_close_to_reference(dbias, leaves["bias"].grad, f32, "grad", what="dbias")


# ---- the reference itself, against independent float64 formulas ------------------------

def test_reference_layer_norm_matches_torch_float64():
    generator = torch.Generator().manual_seed(4)
    x, weight, bias = (torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((4, 37), (37,), (37,)))
    torch.testing.assert_close(ops.layer_norm(x, weight, bias, eps=1e-5, backend="reference"),
                               F.layer_norm(x, (37,), weight, bias, 1e-5), atol=1e-12, rtol=1e-12)
    residual = torch.randn(4, 37, generator=generator, dtype=torch.float64)
    y, residual_out = ops.layer_norm(x, weight, bias, residual=residual, backend="reference")
    torch.testing.assert_close(residual_out, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(y, F.layer_norm(x + residual, (37,), weight, bias, 1e-5), atol=1e-12, rtol=1e-12)


def test_reference_rms_norm_matches_formula_float64():
    generator = torch.Generator().manual_seed(5)
    x, weight = torch.randn(4, 37, generator=generator, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(ops.rms_norm(x, weight, eps=1e-6, backend="reference"), expected,
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_reference_gradcheck_float64(norm):
    generator = torch.Generator().manual_seed(6)
    x, residual = (torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(7, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    if norm == "layer_norm":
        def fn(x, weight, bias, residual):
            return ops.layer_norm(x, weight, bias, residual=residual, backend="reference")
        args = (x, weight, bias, residual)
    else:
        def fn(x, weight, residual):
            return ops.rms_norm(x, weight, residual=residual, backend="reference")
        args = (x, weight, residual)
    assert torch.autograd.gradcheck(fn, args)
