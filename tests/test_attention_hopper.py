"""The Hopper attention forward (tformer/kernels/attention_hopper.py): its dispatch, its key
padding bounds, its numbers against the float64 reference, and its sm_90 code.

On the CPU the new kernel runs under TRITON_INTERPRET=1 (the interpreter runs tensor
descriptors) when forced with TFORMER_ATTENTION_FWD=hopper, through ``tformer.ops.attention``
and the cases of tests/test_attention.py in 16-bit; a spy checks it really ran. The compile test
lowers it for sm_90 in a subprocess without the interpreter. On an sm_90 GPU, "auto" picks it
and tests/test_attention.py's GPU sizes run it; the GPU test here checks that choice.
"""

import logging

import pytest
import torch

from conftest import DEVICE, ON_GPU, requires_backend
from test_attention import CASES, _case_inputs, _mask_case, assert_matches_reference, make_inputs, padding_mask

from tformer.kernels import attention_hopper
from tformer.kernels.launch import interpreter_tiles
from tformer.kernels.attention_hopper import PATH_ENV, forward_path, key_bounds, tma_strides
from tformer.ops import overrides


@pytest.fixture
def hopper_calls(monkeypatch):
    """Forces the Hopper forward and counts its launches (a forced path that did not run fails)."""
    calls = []
    original = attention_hopper.attention_forward_hopper

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setenv(PATH_ENV, "hopper")
    monkeypatch.setattr(attention_hopper, "attention_forward_hopper", spy)
    return calls


# ---------------------------------------------------------------------------------------
# Numbers: the new kernel against the float64 reference (interpreter on CPU)
# ---------------------------------------------------------------------------------------

@requires_backend("triton")
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_forward_matches_reference(hopper_calls, case):
    q, k, v, kwargs = _case_inputs(case, torch.float16)
    assert_matches_reference("triton", q, k, v, f"hopper {case}", **kwargs)
    assert hopper_calls, "the Hopper forward did not run"


@requires_backend("triton")
@pytest.mark.parametrize("persistent", [False, True], ids=["tile_per_program", "persistent"])
def test_hopper_forward_bf16_holes_in_the_mask(hopper_calls, monkeypatch, persistent):
    # Padding that is not a suffix (key 3 of batch 0 padded, batch 1 fully padded): the kernel
    # must load the mask between prefix and end, and give zeros (not NaN) for empty rows.
    monkeypatch.setattr(attention_hopper, "INTERPRETER_PERSISTENT", persistent)
    q, k, v = make_inputs(2, 4, 2, 33, 40, 16, torch.bfloat16)
    mask = padding_mask([37, 0], 40)
    mask[0, 3] = True
    assert_matches_reference("triton", q, k, v, "hopper holes", causal=True, key_padding_mask=mask)
    assert_matches_reference("triton", q, k, v, "hopper holes, negative scale", key_padding_mask=mask, scale=-0.3)
    assert len(hopper_calls) == 2


@requires_backend("triton")
@pytest.mark.parametrize("case", ["bottom_right_sq_gt_sk", "decode_one_query", "window_causal_bottom_right",
                                  "window_symmetric", "softcap_causal_window_padding"])
@pytest.mark.parametrize("persistent", [False, True], ids=["tile_per_program", "persistent"])
def test_hopper_forward_masks(hopper_calls, monkeypatch, case, persistent):
    # Bottom-right alignment, sliding windows and soft-capping on the Hopper forward (the
    # backward is the FA2 kernels', checked by test_attention.py's mask cases).
    monkeypatch.setattr(attention_hopper, "INTERPRETER_PERSISTENT", persistent)
    q, k, v, kwargs = _mask_case(case, torch.bfloat16 if persistent else torch.float16)
    assert_matches_reference("triton", q, k, v, f"hopper {case}", **kwargs)
    assert hopper_calls, "the Hopper forward did not run"


_TABLE_TILES = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for bucket in attention_hopper.HOPPER_CONFIGS.values()
                       for c in bucket})
_TILE_MASKS = {
    # A window that cuts blocks on both sides, aligned bottom-right, with a hole in the padding.
    "window_bottom_right_holes": dict(causal=True, alignment="bottom_right", window=(70, 0)),
    # Plain top-left causal with suffix padding: the unmasked middle stage and the diagonal.
    "causal_padding": dict(causal=True),
    # Symmetric window, soft-capped, no padding.
    "window_softcap": dict(window=(40, 9), softcap=5.0),
}


@pytest.mark.skipif(ON_GPU, reason="runs the GPU tables' tiles under the interpreter; a GPU runs the tables themselves")
@requires_backend("triton")
@pytest.mark.parametrize("mask_name", list(_TILE_MASKS))
@pytest.mark.parametrize("blocks", _TABLE_TILES, ids=lambda blocks: f"{blocks[0]}x{blocks[1]}")
def test_hopper_forward_at_the_tables_tile_shapes(hopper_calls, blocks, mask_name):
    # The other tests run the interpreter's 16x16 tiles, where BLOCK_M == BLOCK_N; the GPU runs
    # HOPPER_CONFIGS' tiles (128x128, 128x64, 64x64, 64x32). Their block ranges (masked first and
    # last blocks, full middle blocks, blocks skipped past the padding's end) and per-row band
    # limits are checked here at those shapes, with lengths a multiple of none of them.
    block_m, block_n = blocks
    q, k, v = make_inputs(1, 2, 1, 150, 290, 16, torch.float16)
    kwargs = dict(_TILE_MASKS[mask_name])
    if mask_name != "window_softcap":
        mask = padding_mask([271], 290)
        if mask_name == "window_bottom_right_holes":
            mask[0, 200] = True  # inside the valid keys: the blocks from there on load the mask
        kwargs["key_padding_mask"] = mask
    with interpreter_tiles(_attention_fwd_hopper_kernel=blocks):
        assert_matches_reference("triton", q * 3, k, v, f"hopper {block_m}x{block_n} {mask_name}", **kwargs)
    assert hopper_calls, "the Hopper forward did not run"


@requires_backend("triton")
def test_hopper_forward_strided_views(hopper_calls):
    # q, k, v split from a fused (B, S, 3, H, D) projection and transposed: TMA-legal strides.
    qkv = torch.randn(2, 33, 3, 2, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert_matches_reference("triton", q, k, v, "hopper strided", causal=True)
    assert hopper_calls


# ---------------------------------------------------------------------------------------
# Dispatch and layout checks
# ---------------------------------------------------------------------------------------

def _half(*shape):
    return torch.zeros(*shape, dtype=torch.float16)


def test_forward_path_choices(monkeypatch):
    q = _half(1, 2, 32, 64)
    monkeypatch.delenv(PATH_ENV, raising=False)
    assert forward_path(q, q, q, False, 0.0) == "fa2"  # CPU tensors: not an sm_90 device
    assert forward_path(q, q, q, False, 0.0, path="hopper") == "hopper"
    monkeypatch.setenv(PATH_ENV, "hopper")
    assert forward_path(q, q, q, False, 0.0) == "fa2"  # the kernels read no environment
    assert overrides.kernel_options("triton", "attention")["fwd_path"] == "hopper"  # the one place that does
    monkeypatch.setenv(PATH_ENV, "fast")
    with pytest.raises(ValueError, match="TFORMER_ATTENTION_FWD is 'fast'; expected one of auto, hopper, fa2"):
        overrides.attention_fwd_path()
    with pytest.raises(ValueError, match="argument 'fwd_path' is 'x'"):
        forward_path(q, q, q, False, 0.0, path="x")


@pytest.mark.parametrize("what, make, reason", [
    ("fp32", lambda: torch.zeros(1, 2, 32, 64), "dtype torch.float32"),
    ("varlen", None, "packed varlen"),
    ("dropout", None, "dropout"),
    ("odd row stride", lambda: _half(1, 2, 32, 20)[..., :17], "S stride 20 elements, not a multiple of 16 bytes"),
    ("head-dim stride", lambda: _half(1, 2, 64, 32).transpose(2, 3), "head-dim stride 32"),
    ("misaligned start", lambda: _half(1 * 2 * 32 * 64 + 1)[1:].view(1, 2, 32, 64), "not 16-byte aligned"),
])
def test_forced_hopper_refuses_what_it_cannot_take(what, make, reason):
    q = make() if make else _half(1, 2, 32, 64)
    with pytest.raises(ValueError, match=f"Hopper forward was forced.*{reason}"):
        forward_path(q, q, q, what == "varlen", 0.1 if what == "dropout" else 0.0, path="hopper")


def test_auto_on_sm90_logs_its_choice_once(monkeypatch, caplog):
    # A CPU stand-in that claims to be an sm_90 CUDA device: the choice and the fallback are logged once.
    class FakeCuda:
        type = "cuda"

    q = _half(1, 2, 32, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(attention_hopper, "_logged", set())
    monkeypatch.delenv(PATH_ENV, raising=False)

    class CudaLooking:  # forwards everything to a tensor but reports a CUDA device
        def __init__(self, t):
            self.t = t

        def __getattr__(self, name):
            return FakeCuda() if name == "device" else getattr(self.t, name)

    with caplog.at_level(logging.INFO, logger=attention_hopper.__name__):
        for _ in range(2):
            assert forward_path(CudaLooking(q), CudaLooking(q), CudaLooking(q), False, 0.0) == "hopper"
            assert forward_path(CudaLooking(q.float()), CudaLooking(q.float()), CudaLooking(q.float()), False, 0.0) == "fa2"
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["attention forward on sm_90: Hopper kernel (TMA descriptors)",
                        "attention forward on sm_90: FlashAttention-2 kernel, because of dtype torch.float32 "
                        "(the Hopper path takes float16/bfloat16)"]
    assert caplog.records[1].levelno == logging.WARNING


def test_tma_strides_replace_size_one_strides():
    # torch may give a size-1 dim any stride; the descriptor gets one that is 16-byte aligned.
    t = _half(1, 1, 5, 24).as_strided((1, 1, 5, 24), (7, 3, 24, 1))
    assert tma_strides(t) == (120, 120, 24)
    assert tma_strides(_half(2, 3, 5, 8)) == (120, 40, 8)
    assert tma_strides(_half(2, 3, 1, 20)) == (60, 20, 24)  # one token: 20 rounded up to 8 elements


def test_key_bounds():
    mask = torch.tensor([[False, False, True, True],     # suffix padding: prefix = end = 2
                         [False, True, False, True],     # a hole: prefix 1, end 3
                         [True, True, True, True],       # all padded
                         [False, False, False, False],   # none padded
                         [True, False, False, False]])   # padded first key: prefix 0, end 4
    prefix, end = key_bounds(mask)
    assert prefix.dtype == end.dtype == torch.int32
    assert prefix.tolist() == [2, 1, 0, 4, 0] and end.tolist() == [2, 3, 0, 4, 4]


# ---------------------------------------------------------------------------------------
# sm_90 code without a GPU: wgmma fed by TMA, no spills, shared memory within 227 KiB
# ---------------------------------------------------------------------------------------

_COMPILE_HOPPER = """
import re
from bench.compile_audit import (H100_SHARED_BYTES, SPILL_TOLERANCE_BYTES, HOPPER_FEATURES, _attention_bucket_cases,
                                 attention_launches, lower_launch, measure)

features = {feature[0]: feature for feature in HOPPER_FEATURES}
# (head-dim bucket, variant, index in HOPPER_CONFIGS[bucket]): the leading candidates, and persistent ones.
picks = [(64, "causal", 0), (128, "causal", 0), (256, "causal", 0), (128, "padding-gqa-causal", 0),
         (256, "padding-gqa-causal", 0), (64, "plain", 1), (128, "causal", 1)]
for bucket, name, index in picks:
    case = list(_attention_bucket_cases("bf16", bucket, "hopper", (features[name],)))[index]
    row = measure(case.compile())
    what = f"{case.variant} {case.config}: {row}"
    assert row["wgmma"] > 0 and row["tma"] > 0, what
    assert row["spill_bytes"] <= SPILL_TOLERANCE_BYTES and row["shared_bytes"] <= H100_SHARED_BYTES, what
    print(what)
# warp_specialize on the key loop: still a no-op for sm_90 (no partitions) with this Triton.
_, kernel, _, args, meta = attention_launches("bf16", 128, features["causal"], "hopper")[0]
ttgir = lower_launch(kernel, args, dict(meta, BLOCK_M=128, BLOCK_N=128, PERSISTENT=False, WARP_SPECIALIZE=True),
                     8, 2).asm["ttgir"]
assert not re.search(r"ttg\\.warp_specialize", ttgir), "warp_specialize now partitions on sm_90: use it"
print("compiled", len(picks) + 1)
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernel is compiled and run by the tests above")
def test_hopper_kernel_compiles_for_sm90_with_wgmma_and_tma():
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_HOPPER], env=env, capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# GPU: auto picks the Hopper kernel on sm_90, and it is right at anchor-like sizes
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not (ON_GPU and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs an sm_90 (Hopper) GPU: 'auto' picks the Hopper kernel only there")
@pytest.mark.parametrize("head_dim, causal", [(64, True), (128, False), (128, True)])
def test_auto_picks_hopper_on_sm90_and_matches_reference(monkeypatch, head_dim, causal):
    calls = []
    original = attention_hopper.attention_forward_hopper
    monkeypatch.setattr(attention_hopper, "attention_forward_hopper", lambda *a: calls.append(1) or original(*a))
    monkeypatch.delenv(PATH_ENV, raising=False)
    q, k, v = make_inputs(2, 4, 2, 1031, 1031, head_dim, torch.bfloat16)
    mask = padding_mask([1031, 700], 1031)
    assert_matches_reference("triton", q, k, v, f"sm_90 D={head_dim}", causal=causal, key_padding_mask=mask)
    assert calls, "auto did not pick the Hopper kernel on sm_90"
