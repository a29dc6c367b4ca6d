"""The sm_90a attention kernels (csrc/attention_sm90/: TMA + wgmma, warp-specialized), forward
and backward, against the sm_80 kernels and the float64 reference, on an H100/H200 (GPU tests;
they skip elsewhere with the reason). The ops' force_sm80 argument (the registry's cuda:sm80
variant; TFORMER_ATTENTION_BWD_FORCE_SM80 for the backward alone) selects the sm_80 path per
call, so both paths run in one process on the same inputs; ``deterministic=`` picks the
backward's one pass (dQ by float32 atomics, the default) or its two deterministic passes. The
shared cases of tests/test_attention.py also take the sm_90a paths on such a GPU (head dims 64
and 128, fp16/bf16)."""

import pytest
import torch

from conftest import ON_GPU
from tolerances import assert_close_to_reference

FORCE_SM80 = "TFORMER_ATTENTION_FORCE_SM80"
BWD_FORCE_SM80 = "TFORMER_ATTENTION_BWD_FORCE_SM80"
FORCED = "sm80: force_sm80 was passed (backend 'cuda:sm80')"


def _hopper_reason() -> str | None:
    if not ON_GPU:
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs an sm_90 GPU (H100/H200), got compute capability {torch.cuda.get_device_capability()}"
    from tformer.backends import cuda as cuda_backend

    if cuda_backend.extension_error() is not None:
        return cuda_backend.extension_error()
    return None


pytestmark = pytest.mark.skipif(_hopper_reason() is not None, reason=str(_hopper_reason()))


def _fwd(q, k, v, *, mask=None, cu_q=None, cu_k=None, max_q=None, max_k=None, causal=False, scale=None,
         force_sm80=False, force_sm80_backward=False):
    import tformer.backends.cuda.attention  # noqa: F401  registers the ops' Python parts

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = cu_q is not None
    max_q = max_q if packed else q.shape[2]
    max_k = max_k if packed else k.shape[2]
    return torch.ops.tformer.cuda_attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, scale,
                                                force_sm80=force_sm80, force_sm80_backward=force_sm80_backward)


def _both_paths(*args, **kwargs):
    return _fwd(*args, **kwargs), _fwd(*args, force_sm80=True, **kwargs)


def _reference(q, k, v, mask, causal, scale):
    """(out, lse) in float64; a fully masked row gives 0 and -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(scores.shape)
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp_min(-1e300)).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v), lse


def _inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, s, head_dim, generator=generator).to("cuda", dtype)
            for h, s in ((heads, seq_q), (kv_heads, seq_k), (kv_heads, seq_k))]


def every_sm90a_instantiation(test):
    """Parametrizes ``test`` over what the sm_90a kernels are built for, causal or not."""
    for name, values in (("causal", [False, True]), ("head_dim", [64, 128]),
                         ("dtype", [torch.float16, torch.bfloat16])):
        test = pytest.mark.parametrize(name, values, ids=str)(test)
    return test


def _cu(lengths):
    """cu_seqlens (int32, on the GPU) of packed sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


# Packed sequences: a one-token query, Sq = Sk, Sq < Sk and a one-key sequence.
LENGTHS_Q, LENGTHS_K = [1, 300, 129, 64], [5, 300, 700, 1]


def _packed_inputs(head_dim, seed):
    """fp16 q (8 heads), k, v (2 heads) of the LENGTHS_* sequences, and the varlen arguments."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), heads, head_dim, generator=generator).to("cuda", torch.float16)
               for lens, heads in ((LENGTHS_Q, 8), (LENGTHS_K, 2), (LENGTHS_K, 2)))
    return q, k, v, (_cu(LENGTHS_Q), _cu(LENGTHS_K), max(LENGTHS_Q), max(LENGTHS_K))


def test_hopper_path_is_selected_and_can_be_forced_off(monkeypatch):
    q = torch.zeros(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv(FORCE_SM80, "1")  # the compiled extension reads no environment
    assert torch.ops.tformer.cuda_attention_fwd_path(q) == "sm90a"
    assert torch.ops.tformer.cuda_attention_fwd_path(q[..., :96].contiguous()).startswith("sm80: head dim 96")
    assert torch.ops.tformer.cuda_attention_fwd_path(q, force_sm80=True) == FORCED


@every_sm90a_instantiation
@pytest.mark.parametrize("seq", [(1, 1), (127, 129), (128, 128), (300, 1000), (1000, 300), (1024, 1024)], ids=str)
def test_matches_sm80_and_reference(dtype, head_dim, causal, seq):
    q, k, v = _inputs(2, 4, 2, *seq, head_dim, dtype)
    mask = torch.arange(seq[1], device="cuda")[None, :] >= torch.tensor([seq[1], max(1, seq[1] // 3)],
                                                                        device="cuda")[:, None]
    scale = head_dim ** -0.5
    (out, lse), (out80, lse80) = _both_paths(q, k, v, mask=mask, causal=causal, scale=scale)
    out64, lse64 = _reference(q, k, v, mask, causal, scale)
    what = f"sm90a D={head_dim} S={seq} causal={causal}"
    assert_close_to_reference(out, out64, dtype, what=f"{what} out")
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), f"{what}: -inf lse rows differ"
    torch.testing.assert_close(lse[finite].double(), lse64[finite], atol=1e-3, rtol=1e-3)
    # The two paths round differently (block sizes), but agree to a few units of the dtype.
    torch.testing.assert_close(out, out80, **({"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else
                                              {"atol": 1.6e-2, "rtol": 1.6e-2}))
    torch.testing.assert_close(lse, lse80, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [-0.125, 0.0, 0.01, 4.0], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=str)
def test_any_scale_and_large_scores_match_reference(scale, causal):
    # The sm_90a softmax takes the row max of raw scores and folds the scale into one FFMA with
    # ex2.approx.ftz; scale <= 0 stays on the sm_80 forward. Scores up to ~1e3 x scale here.
    q, k, v = _inputs(1, 2, 2, 700, 700, 128, torch.bfloat16, seed=3)
    q = q * 8
    (out, lse), _ = _both_paths(q, k, v, causal=causal, scale=scale)
    out64, lse64 = _reference(q, k, v, None, causal, scale)
    assert_close_to_reference(out, out64, torch.bfloat16, what=f"sm90a scale={scale} causal={causal} out")
    torch.testing.assert_close(lse.double(), lse64, atol=2e-2, rtol=1e-3)


def test_fully_masked_rows_give_zeros_and_minus_inf():
    q, k, v = _inputs(2, 2, 2, 300, 300, 128, torch.bfloat16)
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    mask[1, 250:] = False  # sequence 1 keeps keys 250..299
    (out, lse), (out80, lse80) = _both_paths(q, k, v, mask=mask, causal=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    # causal, top-left: rows < 250 of sequence 1 see no kept key; the others see some.
    assert torch.equal(out[1, :, :250], torch.zeros_like(out[1, :, :250])) and torch.isneginf(lse[1, :, :250]).all()
    assert torch.isfinite(lse[1, :, 250:]).all()
    torch.testing.assert_close(out, out80, atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_sm80(head_dim, causal):
    q, k, v, (cu_q, cu_k, max_q, max_k) = _packed_inputs(head_dim, seed=3)
    kwargs = dict(cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, causal=causal)
    (out, lse), (out80, lse80) = _both_paths(q, k, v, **kwargs)
    torch.testing.assert_close(out, out80, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, lse80, atol=1e-4, rtol=1e-4)


def test_strided_views_of_a_fused_qkv():
    qkv = torch.randn(2, 500, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, token stride 3*4*128
    (out, lse), (out80, lse80) = _both_paths(q, k, v, causal=True)
    torch.testing.assert_close(out, out80, atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(lse, lse80, atol=1e-4, rtol=1e-4)


def _set(monkeypatch, variable, value):
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)


def _grads(monkeypatch, q, k, v, grad_out, *, force=None, bwd_force=None, **kwargs):
    """dq, dk, dv through tformer.ops.attention on the cuda backend (``force``: its sm80 variant),
    with the backward-only override."""
    from tformer.ops import attention

    _set(monkeypatch, FORCE_SM80, None)
    _set(monkeypatch, BWD_FORCE_SM80, bwd_force)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    attention(*leaves, backend="cuda:sm80" if force else "cuda", **kwargs).backward(grad_out)
    _set(monkeypatch, BWD_FORCE_SM80, None)
    return [t.grad for t in leaves]


def _reference_grads(q, k, v, grad_out, **kwargs):
    from tformer.ops import attention

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention(*leaves, backend="reference", **kwargs).backward(grad_out.double())
    return [t.grad for t in leaves]


def test_hopper_backward_is_selected_and_can_be_forced_off_alone(monkeypatch):
    q = torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.float16)
    _set(monkeypatch, FORCE_SM80, None)
    _set(monkeypatch, BWD_FORCE_SM80, None)
    assert torch.ops.tformer.cuda_attention_bwd_path(q) == "sm90a"
    assert torch.ops.tformer.cuda_attention_bwd_path(q, force_sm80=True) == FORCED
    assert torch.ops.tformer.cuda_attention_fwd_path(q) == "sm90a"  # each pass has its own argument
    # The override reaches the backward through the registry and autograd: the path it logs.
    from tformer.ops import registry

    monkeypatch.setenv(BWD_FORCE_SM80, "1")
    assert registry.implementation("attention", "cuda")[1].keywords["force_sm80_backward"] is True


@every_sm90a_instantiation
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "two_pass"])
@pytest.mark.parametrize("seq", [(1, 1), (17, 1000), (127, 129), (300, 300), (1000, 17), (1024, 1024)], ids=str)
def test_backward_matches_reference_and_sm80(monkeypatch, dtype, head_dim, causal, seq, deterministic):
    # deterministic=False: the one pass (dQ added by float32 atomics, then converted);
    # True: the two deterministic passes.
    q, k, v = _inputs(2, 4, 2, *seq, head_dim, dtype, seed=1)
    grad_out = torch.randn_like(q)
    # Sequence 1 pads all but its first third of keys: with causal, its late keys get no query.
    mask = torch.arange(seq[1], device="cuda")[None, :] >= torch.tensor([seq[1], max(1, seq[1] // 3)],
                                                                        device="cuda")[:, None]
    kwargs = dict(causal=causal, key_padding_mask=mask, deterministic=deterministic)
    hopper = _grads(monkeypatch, q, k, v, grad_out, **kwargs)
    ampere = _grads(monkeypatch, q, k, v, grad_out, bwd_force="1", **kwargs)
    expected = _reference_grads(q, k, v, grad_out, **kwargs)
    for name, got, other, want in zip(("dq", "dk", "dv"), hopper, ampere, expected):
        scale = max(1.0, want.abs().max().item())
        what = f"sm90a backward {name} D={head_dim} S={seq} causal={causal} deterministic={deterministic}"
        assert_close_to_reference(got, want, dtype, "grad", scale=scale, what=what)
        assert_close_to_reference(other, want, dtype, "grad", scale=scale, what=what.replace("sm90a", "sm80"))
        # Padded keys get exactly zero gradients on both paths.
        if name != "dq":
            assert torch.equal(got[1][:, mask[1]], torch.zeros_like(got[1][:, mask[1]])), f"{what}: padded keys"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "two_pass"])
def test_backward_of_fully_masked_rows_is_zero(monkeypatch, deterministic):
    q, k, v = _inputs(2, 2, 2, 300, 300, 128, torch.bfloat16, seed=2)
    grad_out = torch.randn_like(q)
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    mask[1, 250:] = False
    dq, dk, dv = _grads(monkeypatch, q, k, v, grad_out, causal=True, key_padding_mask=mask,
                        deterministic=deterministic)
    assert not any(torch.isnan(t).any() for t in (dq, dk, dv))
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dq[1, :, :250], torch.zeros_like(dq[1, :, :250]))
    assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[1, :, :250], torch.zeros_like(dv[1, :, :250]))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "two_pass"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_backward_matches_sm80(monkeypatch, head_dim, causal, deterministic):
    from tformer.ops import attention_varlen

    q, k, v, varlen = _packed_inputs(head_dim, seed=4)
    grad_out = torch.randn_like(q)

    def grads(bwd_force):
        _set(monkeypatch, BWD_FORCE_SM80, bwd_force)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention_varlen(*leaves, *varlen, causal=causal, backend="cuda",
                         deterministic=deterministic).backward(grad_out)
        return [t.grad for t in leaves]

    for name, hopper, ampere in zip(("dq", "dk", "dv"), grads(None), grads("1")):
        torch.testing.assert_close(hopper, ampere, atol=4e-3, rtol=4e-3, msg=lambda m: f"varlen {name}: {m}")


def test_backward_of_strided_views_of_a_fused_qkv(monkeypatch):
    qkv = torch.randn(2, 500, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, token stride 3*4*128
    grad_out = torch.randn_like(q)
    hopper = _grads(monkeypatch, q, k, v, grad_out, causal=True)
    expected = _reference_grads(q, k, v, grad_out, causal=True)
    for name, got, want in zip(("dq", "dk", "dv"), hopper, expected):
        assert_close_to_reference(got, want, torch.bfloat16, "grad", scale=max(1.0, want.abs().max().item()),
                                  what=f"strided {name}")


@pytest.mark.parametrize("forward, backward", [("sm90a", "sm80"), ("sm80", "sm90a")])
def test_either_backward_takes_either_forward(forward, backward):
    """Training mixes the paths when one is forced off: out and lse have one layout."""
    q, k, v = _inputs(2, 4, 2, 257, 257, 128, torch.bfloat16)
    grad_out = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = _fwd(*leaves, causal=True, force_sm80=forward == "sm80", force_sm80_backward=backward == "sm80")
    out.backward(grad_out)
    for name, got, want in zip(("dq", "dk", "dv"), (t.grad for t in leaves),
                               _reference_grads(q, k, v, grad_out, causal=True)):
        assert_close_to_reference(got, want, torch.bfloat16, "grad", scale=max(1.0, want.abs().max().item()),
                                  what=f"{name}: {forward} forward, {backward} backward")


# ---- dQ by atomics (the one pass) and the deterministic two passes --------------------------------
def _ops_grads(q, k, v, grad_out, **kwargs):
    from tformer.ops import attention

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    attention(*leaves, backend="cuda", **kwargs).backward(grad_out)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_is_bitwise_reproducible(head_dim, causal):
    # Grouped-query heads (dK/dV summed over the group) and lengths off the block sizes.
    q, k, v = _inputs(2, 8, 2, 700, 700, head_dim, torch.bfloat16, seed=5)
    grad_out = torch.randn_like(q)
    first = _ops_grads(q, k, v, grad_out, causal=causal, deterministic=True)
    second = _ops_grads(q, k, v, grad_out, causal=causal, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"deterministic=True: {name} differs between two identical runs"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_atomic_dq_agrees_with_the_two_passes(head_dim):
    # The one pass computes dK and dV with the dK/dV pass's instructions (expected bitwise equal;
    # held to a few fp16 units here, which the compiler's scheduling cannot exceed), and dQ as the
    # same sum in another order (float32 atomics): close to the two passes' dQ, not equal.
    q, k, v = _inputs(2, 8, 2, 1000, 1000, head_dim, torch.float16, seed=6)
    grad_out = torch.randn_like(q)
    atomic = _ops_grads(q, k, v, grad_out, causal=True)
    two_pass = _ops_grads(q, k, v, grad_out, causal=True, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), atomic, two_pass):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m: f"one pass vs two passes, {name}: {m}")


def test_use_deterministic_algorithms_takes_the_two_passes():
    q, k, v = _inputs(1, 4, 4, 600, 600, 128, torch.bfloat16, seed=7)
    grad_out = torch.randn_like(q)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (_ops_grads(q, k, v, grad_out) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(first, _ops_grads(q, k, v, grad_out, deterministic=True)))
