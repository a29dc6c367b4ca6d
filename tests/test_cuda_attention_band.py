"""The CUDA attention kernels with causal alignment, sliding windows and soft-capping.

Without a GPU: the backend's ``supports`` accepts these arguments (and still refuses dropout),
the ops' schemas take them, and autograd and the fake implementations carry them on meta
tensors. On a GPU: fp16/bf16 outputs, log-sum-exp and gradients against the float64 reference
for both alignments, windows that skip whole key blocks and cut through others, soft-capping
(with saturated tanh), key padding, grouped-query and packed sequences, over the head-dim
buckets. On an sm_90 GPU, head dims 64 and 128 run these cases on the Hopper kernels' banded
variants (the path functions must say "sm90a"), both backward kinds (one pass with atomic dQ,
and the deterministic two passes), and the same grid on the ``cuda:sm80`` variant.
tests/test_attention.py runs the shared mask cases for every backend on top of this.
"""

import importlib

import pytest
import torch

import tformer
from tformer.backends import cuda as cuda_backend
from tformer.ops import registry
from tformer.ops.attention_mask import Band

from conftest import requires_cuda
from tolerances import assert_close_to_reference

pytestmark = pytest.mark.skipif(cuda_backend.extension_error() is not None,
                                reason=f"tformer._C is not built: {cuda_backend.extension_error()}")

HALF_DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def cuda_attention():
    return importlib.import_module("tformer.backends.cuda.attention")


def _meta(shape, dtype=torch.bfloat16, requires_grad=True):
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("band, softcap", [
    (Band(-1, 0, True), 0.0), (Band(16, 0, False), 0.0), (Band(3, 5, True), 0.0), (Band(-1, -1, False), 30.0),
    (Band(8, 0, True), 50.0)], ids=["bottom_right", "window", "window_bottom_right", "softcap", "all"])
def test_supports_accepts_alignment_window_and_softcap(cuda_attention, band, softcap):
    supports = registry._backends["cuda"].impls["attention"].supports
    q = _meta((1, 2, 5, 64), requires_grad=False)
    assert supports(q=q, k=q, v=q, dropout_p=0.0, band=band, softcap=softcap) is None
    assert "dropout_p=0.1" in supports(q=q, k=q, v=q, dropout_p=0.1, band=band, softcap=softcap)


def test_schemas_take_the_band_and_softcap(cuda_attention):
    for op in ("cuda_attention_fwd", "cuda_attention_bwd"):
        schema = str(getattr(torch.ops.tformer, op).default._schema)
        assert ("int window_left=-1, int window_right=-1, bool bottom_right=False, float softcap=0." in schema), \
            schema


def test_autograd_and_fake_carry_the_band_on_meta(cuda_attention):
    q, k, v = _meta((2, 4, 7, 64)), _meta((2, 2, 9, 64)), _meta((2, 2, 9, 64))
    out, lse = cuda_attention.attention(q, k, v, causal=True, key_padding_mask=None, scale=0.125, dropout_p=0.0,
                                        return_lse=True, band=Band(4, 0, True), softcap=20.0)
    assert out.shape == q.shape and lse.shape == (2, 4, 7)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("seq_k, bottom_right_passed", [(7, False), (9, True)])
def test_equal_lengths_pass_bottom_right_as_top_left(cuda_attention, seq_k, bottom_right_passed):
    # Sq == Sk: both alignments are one band, so the op gets top-left (and the Hopper kernels
    # stay eligible); Sq != Sk keeps bottom-right.
    from torch.fx.experimental.proxy_tensor import make_fx

    def call(q, k, v):
        return cuda_attention.attention(q, k, v, causal=True, key_padding_mask=None, scale=0.125, dropout_p=0.0,
                                        return_lse=False, band=Band(-1, 0, True))

    graph = make_fx(call, tracing_mode="fake")(_meta((1, 2, 7, 64)), _meta((1, 2, seq_k, 64)),
                                               _meta((1, 2, seq_k, 64)))
    (node,) = [n for n in graph.graph.nodes if str(n.target) == "tformer.cuda_attention_fwd.default"]
    defaults = [-1, -1, False, 0.0]  # window_left, window_right, bottom_right, softcap (the trace omits defaults)
    band_args = list(node.args[10:14]) + defaults[len(node.args[10:14]):]
    assert band_args == [-1, 0, bottom_right_passed, 0.0]


# ---- GPU only -----------------------------------------------------------------------------------

# (batch, Hq, Hkv, Sq, Sk, D, mask arguments, key lengths or None). Lengths of a few hundred
# against key blocks of 32-64 and query blocks of 64-128: windows skip whole blocks on both
# sides and cut through others; Sq != Sk exercises the bottom-right offset.
GPU_CASES = {
    "d64_window_symmetric": (2, 2, 2, 300, 300, 64, dict(window=(40, 17)), None),
    "d128_causal_bottom_right_sq_lt_sk": (1, 2, 2, 130, 300, 128, dict(causal=True, alignment="bottom_right"), None),
    "d32_causal_bottom_right_sq_gt_sk": (1, 2, 1, 200, 70, 32, dict(causal=True, alignment="bottom_right"), None),
    "d64_decoding_one_query": (2, 4, 1, 1, 257, 64, dict(causal=True, alignment="bottom_right"), [257, 100]),
    "d128_sliding_window_causal_gqa": (2, 4, 2, 500, 500, 128, dict(causal=True, window=(64, 0)), None),
    "d96_left_window_bottom_right": (1, 2, 2, 150, 100, 96, dict(alignment="bottom_right", window=(30, -1)), None),
    "d256_right_window_padding": (2, 2, 2, 65, 70, 256, dict(window=(-1, 3)), [70, 41]),
    "d64_window_zero": (1, 2, 2, 333, 333, 64, dict(window=(0, 0)), None),
    "d40_window_in_64_bucket": (1, 2, 1, 90, 120, 40, dict(window=(10, 10), alignment="bottom_right"), None),
    "d64_softcap": (2, 2, 2, 200, 250, 64, dict(softcap=5.0), None),
    "d128_softcap_causal_window_padding_gqa": (2, 4, 2, 150, 200, 128,
                                               dict(causal=True, alignment="bottom_right", window=(50, 0),
                                                    softcap=10.0), [200, 77]),
    "d256_softcap": (1, 2, 2, 70, 90, 256, dict(softcap=3.0, causal=True), None),
    "d32_softcap_grouped_dkdv": (16, 4, 2, 700, 700, 32, dict(softcap=8.0, window=(100, 0), causal=True), None),
}


def _inputs(batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype, seed=0, magnitude=1.0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, num_heads, seq_q, head_dim), (batch, num_kv_heads, seq_k, head_dim),
              (batch, num_kv_heads, seq_k, head_dim))
    return [(magnitude * torch.randn(*shape, generator=generator)).to("cuda", dtype) for shape in shapes]


def _check(q, k, v, what, fn=tformer.ops.attention, **kwargs):
    from test_cuda_attention_extension import _check_against_reference

    _check_against_reference(q, k, v, what, fn=fn, **kwargs)


@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_matches_reference(case, dtype):
    batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, kwargs, lengths = GPU_CASES[case]
    q, k, v = _inputs(batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, dtype)
    mask = None
    if lengths is not None:
        mask = torch.arange(seq_k, device="cuda")[None, :] >= torch.tensor(lengths, device="cuda")[:, None]
    _check(q, k, v, case, key_padding_mask=mask, **kwargs)


@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_softcap_saturates_on_large_scores(head_dim):
    # Scores of magnitude ~100 against a cap of 2: tanh saturates, its derivative nears 0.
    q, k, v = _inputs(1, 2, 2, 130, 140, head_dim, torch.bfloat16, magnitude=3.0)
    _check(q, k, v, "saturated softcap", scale=1.0, softcap=2.0)


@requires_cuda
def test_rows_outside_every_band_give_zeros_and_minus_inf():
    # Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key.
    q, k, v = _inputs(1, 2, 2, 150, 40, 64, torch.float16)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = tformer.ops.attention(*leaves, causal=True, alignment="bottom_right", return_lse=True,
                                     backend="cuda")
    out.float().sum().backward()
    assert torch.equal(out[:, :, :110], torch.zeros_like(out[:, :, :110]))
    assert torch.isneginf(lse[:, :, :110]).all() and torch.isfinite(lse[:, :, 110:]).all()
    assert torch.equal(leaves[0].grad[:, :, :110], torch.zeros_like(leaves[0].grad[:, :, :110]))


@requires_cuda
@pytest.mark.parametrize("kwargs", [dict(causal=True, alignment="bottom_right"),
                                    dict(causal=True, alignment="bottom_right", window=(20, 0), softcap=6.0),
                                    dict(window=(5, 9))], ids=["bottom_right", "window_softcap", "window"])
def test_varlen_matches_reference(kwargs):
    lengths_q, lengths_k = [1, 70, 0, 133, 90], [5, 64, 3, 100, 90]
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lengths_q), 4, 64, generator=generator).to("cuda", torch.bfloat16)
    k, v = (torch.randn(sum(lengths_k), 2, 64, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    _check(q, k, v, "varlen", fn=tformer.ops.attention_varlen, cu_seqlens_q=cu(lengths_q),
           cu_seqlens_k=cu(lengths_k), max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k), **kwargs)


@requires_cuda
def test_backward_with_window_and_softcap_is_deterministic():
    from test_cuda_attention_extension import _run

    q, k, v = _inputs(2, 8, 2, 400, 400, 128, torch.bfloat16)
    grad_out = torch.randn(q.shape, device="cuda")
    # deterministic=True: on an sm_90 GPU the default backward adds dQ with float32 atomics.
    kwargs = dict(causal=True, window=(100, 0), softcap=20.0, deterministic=True)
    first = _run("cuda", q, k, v, grad_out, **kwargs)
    second = _run("cuda", q, k, v, grad_out, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@requires_cuda
def test_cpp_checks_name_the_band_arguments():
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16)
    fwd = torch.ops.tformer.cuda_attention_fwd
    with pytest.raises(RuntimeError, match="arguments 'window_left' and 'window_right' must be >= 0"):
        fwd(q, q, q, None, None, None, 8, 8, False, 1.0, -2, 0)
    with pytest.raises(RuntimeError, match="argument 'window_right' is 3 but causal=True"):
        fwd(q, q, q, None, None, None, 8, 8, True, 1.0, -1, 3)
    with pytest.raises(RuntimeError, match="argument 'softcap' must be a finite float >= 0"):
        fwd(q, q, q, None, None, None, 8, 8, False, 1.0, -1, -1, False, -1.0)


# ---- GPU only: the Hopper kernels' banded variants (sm_90) and the cuda:sm80 variant ------------

def _hopper_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs an sm_90 GPU (H100/H200), got compute capability {torch.cuda.get_device_capability()}"
    return None


requires_hopper = pytest.mark.skipif(_hopper_reason() is not None, reason=str(_hopper_reason()))

# Bands against 128-row query blocks and 128-key blocks (forward), 128-key blocks with 64- or
# 128-row steps (backward): windows that skip whole blocks and cut others, two-sided, both
# alignments, soft-capping alone and with a window.
SM90_BANDS = {
    "causal_sliding_256": dict(causal=True, window=(256, 0)),
    "two_sided_128": dict(window=(128, 128)),
    "causal_bottom_right": dict(causal=True, alignment="bottom_right"),
    "window_bottom_right": dict(causal=True, alignment="bottom_right", window=(40, 0)),
    "left_window_top_left": dict(window=(17, -1)),
    "softcap": dict(softcap=5.0),
    "softcap_causal_window": dict(causal=True, window=(100, 0), softcap=20.0),
}
# (Sq, Sk): 1, 17 and 1000 tokens, equal and not; with Sq > Sk bottom-right causal, and with
# Sq > Sk + 17 the top-left left window, leave rows with no key (zeros, lse -inf).
SM90_SEQS = [(1, 1), (17, 17), (1, 1000), (17, 1000), (1000, 17), (1000, 1000)]


def _check_backend(backend, q, k, v, what, deterministic=False, **kwargs):
    """out, lse and the gradients of `backend` against the float64 reference."""
    from test_cuda_attention_extension import _run

    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
    got = _run(backend, q, k, v, grad_out, deterministic=deterministic, **kwargs)
    want = _run("reference", q.double(), k.double(), v.double(), grad_out.double(), **kwargs)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1])), f"{what}: lse -inf rows differ"
    finite = torch.isfinite(want[1])
    if finite.any():
        assert_close_to_reference(got[1][finite], want[1][finite], q.dtype, what=f"{what} lse",
                                  scale=max(1.0, want[1][finite].abs().max().item()))
    empty = torch.isneginf(want[1])  # rows with no key: zeros out and zero dq, exactly
    assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty])), f"{what}: out of rows with no key"
    assert torch.equal(got[2][empty], torch.zeros_like(got[2][empty])), f"{what}: dq of rows with no key"
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got[0], *got[2:]), (want[0], *want[2:])):
        assert_close_to_reference(a, b, q.dtype, "forward" if name == "out" else "grad",
                                  scale=max(1.0, b.abs().max().item()), what=f"{what} {name}")


@requires_hopper
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqs", SM90_SEQS, ids=str)
@pytest.mark.parametrize("band", list(SM90_BANDS))
def test_hopper_banded_kernels_match_reference(band, seqs, head_dim, dtype):
    seq_q, seq_k = seqs
    # Query heads = key/value heads: grouped-query attention on few key blocks would send the
    # backward to the expanded dK/dV pass on sm80 (test_hopper_banded_gqa_matches_reference).
    q, k, v = _inputs(2, 4, 4, seq_q, seq_k, head_dim, dtype)
    # These calls take the sm_90a kernels (their banded variants): nothing routes a band to sm80.
    assert torch.ops.tformer.cuda_attention_fwd_path(q) == "sm90a"
    assert torch.ops.tformer.cuda_attention_bwd_path(q) == "sm90a"
    _check_backend("cuda", q, k, v, f"sm90a {band} {seqs}", **SM90_BANDS[band])


@requires_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("band", ["causal_sliding_256", "window_bottom_right", "softcap_causal_window"])
def test_hopper_banded_deterministic_backward_matches_reference(band, head_dim):
    q, k, v = _inputs(2, 4, 4, 1000, 700, head_dim, torch.bfloat16)
    _check_backend("cuda", q, k, v, f"sm90a two passes {band}", deterministic=True, **SM90_BANDS[band])


@requires_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_banded_gqa_matches_reference(head_dim):
    # 11 key blocks x 2 kv heads x 16 sequences: enough dK/dV blocks for the grouped sm_90a pass.
    q, k, v = _inputs(16, 4, 2, 1300, 1300, head_dim, torch.float16)
    _check_backend("cuda", q, k, v, "sm90a gqa", **SM90_BANDS["softcap_causal_window"])


@requires_hopper
def test_hopper_banded_varlen_matches_reference():
    lengths_q, lengths_k = [1, 300, 129, 17], [5, 300, 700, 1]
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lengths_q), 4, 128, generator=generator).to("cuda", torch.float16)
    k, v = (torch.randn(sum(lengths_k), 4, 128, generator=generator).to("cuda", torch.float16) for _ in range(2))

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    _check(q, k, v, "sm90a varlen", fn=tformer.ops.attention_varlen, cu_seqlens_q=cu(lengths_q),
           cu_seqlens_k=cu(lengths_k), max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k), causal=True,
           alignment="bottom_right", window=(64, 0), softcap=10.0)


@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqs", [(17, 1000), (1000, 17), (1000, 1000)], ids=str)
@pytest.mark.parametrize("band", list(SM90_BANDS))
def test_sm80_variant_matches_reference(band, seqs, head_dim, dtype):
    seq_q, seq_k = seqs
    q, k, v = _inputs(2, 4, 2, seq_q, seq_k, head_dim, dtype)
    assert torch.ops.tformer.cuda_attention_fwd_path(q, force_sm80=True).startswith("sm80")
    _check_backend("cuda:sm80", q, k, v, f"sm80 {band} {seqs}", **SM90_BANDS[band])


@requires_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("band", ["causal_sliding_256", "window_bottom_right", "softcap"])
def test_banded_calls_run_the_hopper_kernels(band, head_dim):
    # The path functions answer from q alone; that a banded call really leaves the sm_80 kernels
    # shows in its bits: the two kernel families sum in different orders (128-key blocks and
    # wgmma against 64-key blocks and mma.sync), so "cuda" and "cuda:sm80" differ somewhere in
    # 1000 x 1000 scores, where the same kernels would give equal bits.
    from test_cuda_attention_extension import _run

    q, k, v = _inputs(1, 4, 4, 1000, 1000, head_dim, torch.bfloat16)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
    hopper = _run("cuda", q, k, v, grad_out, deterministic=True, **SM90_BANDS[band])
    sm80 = _run("cuda:sm80", q, k, v, grad_out, deterministic=True, **SM90_BANDS[band])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), hopper, sm80):
        assert not torch.equal(a, b), f"{band}: {name} bitwise equal on both paths (the band stayed on sm80?)"
