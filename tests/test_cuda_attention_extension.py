"""The CUDA C++ attention ops (csrc/attention/, tformer/backends/cuda/attention.py).

Without a GPU: op registration and schemas, the refusals of the registered functions
(dropout, head dims, strides), and the autograd and fake implementations traced on meta
tensors (what torch.compile relies on). On a GPU: fp16/bf16 results and gradients against
the float64 reference over the features of issue 7 (head-dim buckets, causal with Sq != Sk,
key padding, packed sequences, grouped-query, strided views, fully masked rows), bitwise
deterministic gradients, and the C++ argument checks. tests/test_attention.py runs the
shared cases for every backend on top of this.
"""

import importlib
import inspect

import pytest
import torch

import tformer
from tformer.backends import cuda as cuda_backend
from tformer.ops import overrides, registry

from conftest import requires_cuda
from tolerances import assert_close_to_reference

pytestmark = pytest.mark.skipif(cuda_backend.extension_error() is not None,
                                reason=f"tformer._C is not built: {cuda_backend.extension_error()}")

EXPECTED_SCHEMAS = {
    "cuda_attention_fwd": "tformer::cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
                          "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
                          "bool causal, float scale, int window_left=-1, int window_right=-1, bool bottom_right=False, "
                          "float softcap=0., bool deterministic=False, bool force_sm80=False, "
                          "bool force_sm80_backward=False) -> (Tensor out, Tensor lse)",
    "cuda_attention_bwd": "tformer::cuda_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
                          "Tensor lse, Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
                          "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left=-1, "
                          "int window_right=-1, bool bottom_right=False, float softcap=0., "
                          "bool deterministic=False, bool force_sm80=False) -> (Tensor dq, Tensor dk, Tensor dv)",
}
HALF_DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def cuda_attention():
    """The backend's attention module, imported directly: without a GPU the registry never
    loads it, but its autograd and fake registrations work on meta tensors."""
    return importlib.import_module("tformer.backends.cuda.attention")


def _meta(shape, dtype=torch.bfloat16, requires_grad=True):
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("op", sorted(EXPECTED_SCHEMAS))
def test_op_is_registered_with_schema_cuda_kernel_and_fake(cuda_attention, op):
    assert str(getattr(torch.ops.tformer, op).default._schema) == EXPECTED_SCHEMAS[op]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tformer::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tformer::{op}", "Meta")


@pytest.mark.parametrize("op", ["cuda_attention_fwd_path", "cuda_attention_bwd_path"])
def test_path_queries_are_registered(cuda_attention, op):
    # Which kernels (sm90a or sm80 and why) a tensor's pass gets; CUDA-only queries, no fake needed.
    assert str(getattr(torch.ops.tformer, op).default._schema) == f"tformer::{op}(Tensor q, bool force_sm80=False) -> str"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tformer::{op}", "CUDA")


@pytest.mark.parametrize("force_sm80, force_sm80_backward, expected", [
    (False, False, (False, False)), (True, False, (True, True)), (False, True, (False, True))])
def test_sm80_choice_reaches_both_ops_as_arguments(cuda_attention, force_sm80, force_sm80_backward, expected):
    """The registry's choice (the cuda:sm80 variant, or the overrides) is an argument of the
    forward op, and autograd hands the backward's to cuda_attention_bwd: traced on meta tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def train_step(q, k, v):
        out = cuda_attention.attention(q, k, v, causal=True, key_padding_mask=None, scale=0.125, dropout_p=0.0,
                                       return_lse=False, force_sm80=force_sm80,
                                       force_sm80_backward=force_sm80_backward)
        return torch.autograd.grad(out.float().sum(), (q, k, v))

    graph = make_fx(train_step, tracing_mode="fake")(*(_meta((1, 2, 8, 64)) for _ in range(3)))

    def argument(op, name):
        (node,) = [n for n in graph.graph.nodes if str(n.target) == f"tformer.{op}.default"]
        schema = getattr(torch.ops.tformer, op).default._schema
        index = [a.name for a in schema.arguments].index(name)
        return node.kwargs.get(name, node.args[index] if index < len(node.args) else False)

    assert (argument("cuda_attention_fwd", "force_sm80"), argument("cuda_attention_bwd", "force_sm80")) == expected


def test_key_grad_block_shape_follows_the_devices_shared_memory(cuda_attention):
    """8-warp, 128-key dK/dV blocks: always up to head dim 96; at 128 only where a block may take
    102.5 KiB (sm80 163 KiB, sm90 227 KiB; not sm86/sm89's 99 KiB); never at 256."""
    wide = torch.ops.tformer.cuda_attention_key_grad_wide
    kib = 1024
    for head_dim in (8, 32, 40, 64, 96):
        assert wide(head_dim, 48 * kib) and wide(head_dim, 99 * kib)
    assert not wide(128, 99 * kib) and not wide(128, 102 * kib)
    assert wide(128, 163 * kib) and wide(128, 227 * kib) and wide(120, 227 * kib)
    assert not wide(256, 227 * kib) and not wide(160, 227 * kib)
    assert not wide(12, 227 * kib)  # not a supported head dim


def test_public_functions_have_reference_signatures_and_half_dtypes_only(cuda_attention):
    assert "attention" in cuda_backend.OP_MODULES
    reference = importlib.import_module("tformer.backends.reference.attention")
    for op in ("attention", "attention_varlen"):
        impl = registry._backends["cuda"].impls[op]
        assert impl.devices == frozenset({"cuda"})
        assert impl.dtypes == frozenset(HALF_DTYPES)  # float32 is refused before any kernel runs
        expected = inspect.signature(getattr(reference, op)).parameters
        actual = inspect.signature(impl.fn).parameters
        # The reference's arguments, then the kernel options the registry binds (a variant's or an override's).
        options = set(overrides.kernel_options("cuda", op))
        assert [(p.name, p.kind) for p in actual.values() if p.name not in options] == \
            [(p.name, p.kind) for p in expected.values()], op
        assert options == {"force_sm80", "force_sm80_backward", "force_sm80_banded"} and all(
            actual[name].kind is inspect.Parameter.KEYWORD_ONLY and actual[name].default is False for name in options)


def test_supports_refuses_dropout_head_dims_and_strided_last_dim(cuda_attention):
    supports = registry._backends["cuda"].impls["attention"].supports
    q = k = v = _meta((1, 2, 5, 64), requires_grad=False)
    assert supports(q=q, k=k, v=v, dropout_p=0.0, causal=True) is None
    assert "dropout_p=0.1" in supports(q=q, k=k, v=v, dropout_p=0.1)
    for head_dim in (40, 160, 256, 8):  # multiples of 8 up to 256 run in the next bucket
        t = _meta((1, 2, 5, head_dim), requires_grad=False)
        assert supports(q=t, k=t, v=t, dropout_p=0.0) is None, head_dim
    for head_dim in (12, 264):
        t = _meta((1, 2, 5, head_dim), requires_grad=False)
        assert f"got {head_dim}" in supports(q=t, k=t, v=t, dropout_p=0.0)
    strided = _meta((1, 2, 64, 5), requires_grad=False).transpose(-1, -2)
    assert "argument 'k' with a contiguous last dim" in supports(q=q, k=strided, v=v, dropout_p=0.0)


def test_direct_call_with_dropout_raises_value_error(cuda_attention):
    q = _meta((1, 2, 5, 64))
    with pytest.raises(ValueError, match="dropout_p=0.5"):
        cuda_attention.attention(q, q, q, causal=False, key_padding_mask=None, scale=0.125, dropout_p=0.5,
                                 return_lse=False)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_autograd_shapes_on_meta(cuda_attention, dtype, with_mask):
    q, k, v = _meta((2, 4, 7, 64), dtype), _meta((2, 2, 9, 64), dtype), _meta((2, 2, 9, 64), dtype)
    mask = torch.zeros(2, 9, dtype=torch.bool, device="meta") if with_mask else None
    out, lse = cuda_attention.attention(q, k, v, causal=True, key_padding_mask=mask, scale=0.125, dropout_p=0.0,
                                        return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32 and not lse.requires_grad
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    for leaf, grad in zip((q, k, v), grads):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype


def test_attention_varlen_autograd_shapes_on_meta(cuda_attention):
    q, k, v = _meta((23, 4, 128)), _meta((30, 1, 128)), _meta((30, 1, 128))
    cu_q = torch.empty(4, dtype=torch.int32, device="meta")
    cu_k = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = cuda_attention.attention_varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17,
                                               max_seqlen_k=17, causal=False, scale=0.1, dropout_p=0.0,
                                               return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, 23) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_fwd_and_bwd_ops_trace_into_one_graph(cuda_attention):
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(q, k, v):
        out = cuda_attention.attention(q, k, v, causal=True, key_padding_mask=None, scale=0.125, dropout_p=0.0,
                                       return_lse=False)
        return torch.autograd.grad(out.float().sum(), (q, k, v))

    graph = make_fx(step, tracing_mode="fake")(_meta((1, 2, 5, 32)), _meta((1, 1, 6, 32)), _meta((1, 1, 6, 32)))
    targets = {str(node.target) for node in graph.graph.nodes}
    assert {"tformer.cuda_attention_fwd.default", "tformer.cuda_attention_bwd.default"} <= targets


def test_torch_compile_fullgraph_on_meta(cuda_attention):
    def loss(q, k, v):
        out = cuda_attention.attention(q, k, v, causal=False, key_padding_mask=None, scale=0.125, dropout_p=0.0,
                                       return_lse=False)
        return out.float().sum()

    q, k, v = _meta((1, 2, 5, 64), torch.float16), _meta((1, 2, 5, 64), torch.float16), _meta((1, 2, 5, 64),
                                                                                                torch.float16)
    torch._dynamo.reset()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v).backward()
    assert q.grad.shape == q.shape and k.grad.dtype == torch.float16


# ---- GPU only -----------------------------------------------------------------------------------

def _inputs(batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, num_heads, seq_q, head_dim), (batch, num_kv_heads, seq_k, head_dim),
              (batch, num_kv_heads, seq_k, head_dim))
    return [torch.randn(*shape, generator=generator).to("cuda", dtype) for shape in shapes]


def _run(backend, q, k, v, grad_out, fn=tformer.ops.attention, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, backend=backend, return_lse=True, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return (out, lse, *(t.grad for t in leaves))


def _check_against_reference(q, k, v, what, fn=tformer.ops.attention, **kwargs):
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
    got = _run("cuda", q, k, v, grad_out, fn, **kwargs)
    want = _run("reference", q.double(), k.double(), v.double(), grad_out.double(), fn, **kwargs)
    finite = torch.isfinite(want[1])
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1])), f"{what}: lse -inf rows differ"
    if finite.any():  # float32, from scores of inputs rounded to q's dtype: q's forward tolerance
        assert_close_to_reference(got[1][finite], want[1][finite], q.dtype, what=f"{what} lse",
                                  scale=max(1.0, want[1][finite].abs().max().item()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got[0], *got[2:]), (want[0], *want[2:])):
        assert_close_to_reference(a, b, q.dtype, "forward" if name == "out" else "grad",
                                  scale=max(1.0, b.abs().max().item()), what=f"{what} {name}")


# (batch, Hq, Hkv, Sq, Sk, D, causal, key lengths or None)
GPU_CASES = {
    "d64": (2, 2, 2, 100, 100, 64, False, None),
    "d128_causal": (1, 2, 2, 130, 130, 128, True, None),
    "d32_sq_gt_sk_causal": (1, 2, 1, 77, 40, 32, True, None),
    "d96_sq_lt_sk_causal": (1, 2, 2, 40, 150, 96, True, None),
    "d256_gqa_padding": (2, 4, 2, 65, 70, 256, True, [70, 31]),
    "d40_in_64_bucket": (2, 4, 1, 33, 17, 40, True, [17, 6]),
    "d16_in_32_bucket": (1, 1, 1, 1, 33, 16, False, None),
    "d160_in_256_bucket": (1, 2, 2, 17, 5, 160, False, None),
    "long_mqa": (1, 8, 1, 600, 700, 64, True, [700]),
    # Mask-free interior blocks beside the diagonal and the partial last block (no padding).
    "d64_causal_full_blocks": (2, 4, 4, 300, 300, 64, True, None),
    "d128_full_blocks": (1, 2, 2, 256, 320, 128, False, None),
    # Grouped-query attention with enough key blocks (11 x 2 kv heads x 16 = 352 >= 2 per SM up
    # to 176 SMs) for the grouped dK/dV pass; the smaller GQA cases above take the expanded one.
    "gqa_grouped_dkdv": (16, 4, 2, 1300, 1300, 64, True, None),
    # Head dim 128 on a GPU with >= 102.5 KiB of shared memory a block (A100, H100) takes the
    # 8-warp, 128-key dK/dV blocks: expanded (small GQA) and grouped (11 x 2 x 16 = 352 blocks).
    "d128_gqa_padding_expanded_dkdv": (2, 4, 2, 150, 200, 128, True, [200, 77]),
    "d128_gqa_grouped_dkdv": (16, 4, 2, 1300, 1300, 128, True, None),
}


@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_matches_reference(case, dtype):
    batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, causal, lengths = GPU_CASES[case]
    q, k, v = _inputs(batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype)
    mask = None
    if lengths is not None:
        mask = torch.arange(seq_k, device="cuda")[None, :] >= torch.tensor(lengths, device="cuda")[:, None]
    _check_against_reference(q, k, v, case, causal=causal, key_padding_mask=mask)


@requires_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_reference(causal):
    lengths_q, lengths_k = [1, 70, 0, 33], [5, 64, 3, 100]
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lengths_q) + 3, 4, 64, generator=generator).to("cuda", torch.bfloat16)  # 3 stray tokens
    k, v = (torch.randn(sum(lengths_k), 2, 64, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    kwargs = dict(cu_seqlens_q=cu(lengths_q), cu_seqlens_k=cu(lengths_k), max_seqlen_q=max(lengths_q),
                  max_seqlen_k=max(lengths_k), causal=causal)
    out, lse = tformer.ops.attention_varlen(q, k, v, backend="cuda", return_lse=True, **kwargs)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:])) and torch.isneginf(lse[:, -3:]).all()
    used = sum(lengths_q)
    _check_against_reference(q[:used], k, v, "varlen", fn=tformer.ops.attention_varlen, **kwargs)


@requires_cuda
def test_strided_views_and_fully_masked_rows():
    qkv = torch.randn(2, 50, 3, 4, 64, generator=torch.Generator().manual_seed(3)).to("cuda", torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, strides of the fused tensor
    mask = torch.zeros(2, 50, dtype=torch.bool, device="cuda")
    mask[1] = True  # every key of batch 1 is padding
    mask[0, 0] = True  # under causal, query 0 of batch 0 sees nothing
    grad_out = torch.randn(q.shape, device="cuda")
    out, lse, dq, dk, dv = _run("cuda", q, k, v, grad_out, causal=True, key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, 0]).all() and torch.isfinite(lse[0, :, 1:]).all()
    for grad in (dq[1], dk[1], dv[1], dq[0, :, 0]):
        assert torch.equal(grad, torch.zeros_like(grad))
    _check_against_reference(q, k, v, "strided", causal=True, key_padding_mask=mask)


@requires_cuda
def test_unaligned_view_and_expanded_grad_out():
    base = torch.randn(1 * 2 * 33 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q = base[1:].view(1, 2, 33, 64)  # starts 2 bytes past a 16-byte boundary: copied once
    k, v = _inputs(1, 2, 2, 33, 33, 64, torch.bfloat16)
    _check_against_reference(q, k, v, "unaligned")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    tformer.ops.attention(*leaves, backend="cuda").sum().backward()  # grad_out expanded, stride 0
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@requires_cuda
def test_backward_is_deterministic():
    # deterministic=True: the Hopper backward's two passes too (by default it adds dQ by atomics,
    # whose order varies: tests/test_cuda_attention_sm90.py checks that path).
    q, k, v = _inputs(2, 8, 2, 500, 500, 128, torch.bfloat16)
    grad_out = torch.randn(q.shape, device="cuda")
    first = _run("cuda", q, k, v, grad_out, causal=True, deterministic=True)
    second = _run("cuda", q, k, v, grad_out, causal=True, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@requires_cuda
def test_cpp_checks_name_the_argument():
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16)
    fwd = torch.ops.tformer.cuda_attention_fwd
    with pytest.raises(RuntimeError, match="argument 'q' has dtype Float"):
        fwd(q.float(), q.float(), q.float(), None, None, None, 8, 8, False, 1.0)
    with pytest.raises(RuntimeError, match="argument 'v' has dtype BFloat16, expected Half"):
        fwd(q, q, q.bfloat16(), None, None, None, 8, 8, False, 1.0)
    odd = torch.randn(1, 2, 8, 12, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim 12"):
        fwd(odd, odd, odd, None, None, None, 8, 8, False, 1.0)
    strided = torch.randn(1, 2, 64, 8, device="cuda", dtype=torch.float16).transpose(-1, -2)
    with pytest.raises(RuntimeError, match="argument 'k' must have a contiguous last"):
        fwd(q, strided, q, None, None, None, 8, 8, False, 1.0)
    with pytest.raises(RuntimeError, match="argument 'key_padding_mask' has dtype Float"):
        fwd(q, q, q, torch.zeros(1, 8, device="cuda"), None, None, 8, 8, False, 1.0)
    with pytest.raises(RuntimeError, match="argument 'q' must be a CUDA tensor"):
        fwd(q.cpu(), q, q, None, None, None, 8, 8, False, 1.0)
