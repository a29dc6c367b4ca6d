"""FlashAttention's test grid (bench/flash_attn_grid.py) with FlashAttention's acceptance rule.

On the CPU a seeded sample of interpreter-sized cases runs for every backend (Triton under
TRITON_INTERPRET=1, whose float32 -> bfloat16 conversion is made round-to-nearest by the
kernels' ``narrow``, so bf16 cases measure the kernels, not the interpreter). On a GPU a larger
sample runs; ``TFORMER_FLASH_GRID=full`` selects the whole grid (thousands of cases: a GPU proof
run, also reachable as ``python -m bench.flash_attn_grid`` and ``bench.gpu_sweep --flash-grid``).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

import tformer

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/ lives beside tests/, not in the package
from bench.flash_attn_grid import GridCase, full_grid, run_case, sample  # noqa: E402

from conftest import DEVICE, ON_GPU, requires_backend

if ON_GPU:
    CASES = full_grid() if os.environ.get("TFORMER_FLASH_GRID") == "full" else sample(96, seed=0, device="cuda")
else:
    CASES = sample(5, seed=0, device="cpu")  # about 60 s of interpreted Triton


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_flash_attention_grid(backend, case):
    result = run_case(case, backend, DEVICE.type)
    if result["status"] == "skipped":
        pytest.skip(result["detail"])
    assert result["status"] == "ok", f"{case.name} (seed {case.seed}): {result['detail']}"


def test_grid_covers_flash_attentions_dimensions():
    grid = full_grid()
    assert {c.head_dim for c in grid} >= {32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256}
    assert {(c.seqlen_q, c.seqlen_k) for c in grid} >= {(113, 203), (128, 217), (512, 256), (1, 147), (2048, 2048)}
    assert {c.mha_type for c in grid} == {"mha", "mqa", "gqa"}
    assert {(c.mask, c.alignment) for c in grid} >= {("causal", "bottom_right"), ("causal", "top_left"),
                                                      ("local", "bottom_right"), ("causal_local", "top_left")}
    assert {c.softcap for c in grid} == {0.0, 50.0} and {c.padding for c in grid} == {"none", "full", "random", "third"}
    assert sample(6, 0, "cpu") == sample(6, 0, "cpu")


def test_the_rule_catches_a_wrong_alignment(monkeypatch):
    # A backend that answers top-left when asked bottom-right (tformer before alignment existed)
    # fails the rule on a decoding case; the honest reference passes it.
    case = GridCase(32, 1, 147, "mqa", "causal", "bottom_right", 0.0, "none", "float16", seed=3)
    assert run_case(case, "reference", DEVICE.type)["status"] == "ok"
    honest = tformer.ops.attention

    def top_left(*args, alignment="top_left", **kwargs):
        return honest(*args, **kwargs)

    monkeypatch.setattr(tformer.ops, "attention", top_left)
    result = run_case(case, "reference", DEVICE.type)
    assert result["status"] == "wrong" and "out" in result["detail"]


if tformer.available_backends()["triton"] is None:
    import triton
    import triton.language as tl

    from tformer.kernels.attention_tiles import narrow

    @triton.jit
    def _narrow_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, narrow(tl.load(X + offs), Y.dtype.element_ty, True))


@requires_backend("triton")
@pytest.mark.skipif(ON_GPU, reason="checks the interpreter's bf16 conversion; a GPU rounds natively")
def test_interpreter_rounds_bfloat16_to_nearest():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 100
    x[:3] = torch.tensor([float("inf"), -float("inf"), 0.0])
    y = torch.empty(4096, dtype=torch.bfloat16)
    _narrow_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.to(torch.bfloat16))  # torch rounds to nearest even
    truncated = (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(y, truncated)
