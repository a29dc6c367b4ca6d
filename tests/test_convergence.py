"""Convergence, in the style of Liger-Kernel's mini-model tests: the same tiny DecoderLM trained
for 20 steps with each available backend (torch; triton under the interpreter on a CPU; cuda on
a GPU) follows the reference backend's loss curve.

Stated tolerance: every step's loss within ``LOSS_RTOL`` (relative) of the reference's in
float32 (kernels sum in other orders, and 20 AdamW steps let the rounding differences grow a
little), and the loss must fall, so a backend that trains nothing cannot pass.
"""

import pytest
import torch
import torch.nn.functional as F

from tformer.models import DecoderLM, ModelConfig

from conftest import DEVICE, backend_params, call_or_skip

STEPS = 20
LOSS_RTOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}
VOCAB, SEQ_LEN, BATCH = 32, 16, 4


def _batches():
    """Token streams with structure to learn (each token predicts the next of a cycle, with noise)."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (STEPS, BATCH, 1), generator=generator)
    tokens = (starts + torch.arange(SEQ_LEN + 1)) % VOCAB
    noise = torch.rand(tokens.shape, generator=generator) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, tokens.shape, generator=generator), tokens).to(DEVICE)


def loss_curve(backend: str, dtype: torch.dtype) -> list[float]:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ_LEN, d_model=32, n_layers=2, n_heads=2,
                                  dropout=0.0, backend=backend)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for tokens in _batches():
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference_curves():
    return {}


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_curve_follows_the_reference(backend, dtype, reference_curves):
    if dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("bf16 autocast convergence runs on a GPU (the CPU run checks float32)")
    if dtype not in reference_curves:
        reference_curves[dtype] = loss_curve("reference", dtype)
    expected = reference_curves[dtype]
    actual = call_or_skip(loss_curve, backend, dtype)
    assert expected[-1] < expected[0] - 0.5, f"the reference does not learn: {expected}"
    for step, (got, want) in enumerate(zip(actual, expected)):
        assert abs(got - want) <= LOSS_RTOL[dtype] * abs(want), (
            f"{backend} step {step}: loss {got:.5f}, reference {want:.5f} (rtol {LOSS_RTOL[dtype]}); "
            f"curve {actual} vs {expected}")
