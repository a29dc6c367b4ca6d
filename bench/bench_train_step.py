"""Training step of tformer's DecoderLM (each backend, eager and torch.compile) against the
same model written in plain PyTorch (bench/plain_gpt.py), eager and compiled, in one run:
tokens/s, MFU and peak memory. Target: tformer >= 1.3x the plain torch.compile tokens/s."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
import torch.nn.functional as F

import tformer

from bench.candidates import Candidate, candidate_params
from bench.metrics import check_training_works, describe, record_train_step
from bench.plain_gpt import PlainGPT, PlainGPTConfig
from bench.shapes import DEVICE, ON_GPU
from bench.timing import run_benchmark

VOCAB_SIZE = 256
# (name, dimensions, batch): the two model sizes of ANCHORS.md at T = 1024 on a GPU; a tiny
# model on a CPU so the smoke run takes seconds.
if ON_GPU:
    SEQ_LEN = 1024
    MODEL_SIZES = [("d512-L12-H8", dict(d_model=512, n_layers=12, n_heads=8), 32),
                   ("d768-L12-H12", dict(d_model=768, n_layers=12, n_heads=12), 16)]
else:
    SEQ_LEN = 32
    MODEL_SIZES = [("tiny-d64-L2-H4", dict(d_model=64, n_layers=2, n_heads=4), 2)]
WARMUP_STEPS = 3  # the first compiled step compiles; later ones may recompile once
LEARNING_RATE = 1e-3
# How far the loss of a tformer backend may be from the reference backend's on the same weights.
LOSS_TOLERANCE = 2e-2 if ON_GPU else 1e-4


def _decoder_lm(dims: dict, backend: str):
    from tformer.models import DecoderLM, ModelConfig

    return DecoderLM(ModelConfig(vocab_size=VOCAB_SIZE, max_seq_len=SEQ_LEN, backend=backend, **dims))


def _tformer_model(backend: str):
    return lambda dims: _decoder_lm(dims, backend)


def _plain_model(dims: dict):
    return PlainGPT(PlainGPTConfig(vocab_size=VOCAB_SIZE, max_seq_len=SEQ_LEN, **dims))


CANDIDATES = [Candidate(f"tformer-{name}", "tformer", _tformer_model(name))
              for name in (*tformer.available_backends(), "auto")]
CANDIDATES.append(Candidate("plain-torch", "anchor", _plain_model))


def _autocast(device: torch.device):
    # bf16 autocast on a GPU (as ANCHORS.md); float32 on the CPU.
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(model, tokens, targets, device) -> torch.Tensor:
    with _autocast(device):
        logits = model(tokens)
    return F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.view(-1))


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("size", MODEL_SIZES, ids=[size[0] for size in MODEL_SIZES])
@pytest.mark.parametrize("candidate", candidate_params(CANDIDATES, DEVICE))
def test_train_step(benchmark, candidate, size, mode, device, ceilings, device_info):
    if mode == "compile" and device.type != "cuda":
        pytest.skip("CPU: eager only (torch.compile takes longer than the CPU smoke run's budget)")
    name, dims, batch = size
    generator = torch.Generator(device=device).manual_seed(0)
    # One fixed batch: the step's cost does not depend on the data, and repeated steps on the
    # same batch must lower its loss, which the gate below checks.
    tokens, targets = (torch.randint(0, VOCAB_SIZE, (batch, SEQ_LEN), generator=generator, device=device)
                       for _ in range(2))

    torch.manual_seed(0)
    model = candidate.call(dims).to(device)
    reference = _decoder_lm(dims, "reference").to(device)
    params = _count_params(model)
    # Correctness gate 1: the same model (plain PyTorch or tformer), parameter for parameter.
    assert params == _count_params(reference), (
        f"{candidate.name} has {params} parameters, tformer's DecoderLM has {_count_params(reference)}")
    flops_per_token = reference.flops_per_token(SEQ_LEN)
    # Correctness gate 2: a tformer backend gives the reference backend's loss on the same weights.
    if candidate.kind == "tformer" and candidate.name != "tformer-reference":
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            expected, actual = (float(_loss(m, tokens, targets, device)) for m in (reference, model))
        assert abs(actual - expected) <= LOSS_TOLERANCE, (
            f"{candidate.name}: initial loss {actual:.5f}, reference backend {expected:.5f}")
    del reference

    runner = torch.compile(model) if mode == "compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda")

    def step():
        loss = _loss(runner, tokens, targets, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        losses = [float(step()) for _ in range(WARMUP_STEPS)]
    except torch.OutOfMemoryError as error:
        out_of_memory = str(error).splitlines()[0]
    else:
        out_of_memory = None
    if out_of_memory:
        # Free the model before skipping, so the next rows start from an empty GPU.
        del model, runner, optimizer
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{candidate.name} {name} batch {batch}: out of memory ({out_of_memory})")
    # Correctness gate 3: training works: finite losses that go down on the fixed batch.
    check_training_works(candidate.name, losses)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    describe(benchmark, op="train_step", pass_name="fwd+bwd+adamw", candidate=candidate, suite="train_step",
             shape=(batch, SEQ_LEN), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
             device_info=device_info, ceilings=ceilings, check="param count = DecoderLM; loss = reference "
             "backend's; loss decreases", max_abs_error=0.0, model=name, mode=mode, batch=batch,
             seq_len=SEQ_LEN, params=params, warmup_losses=losses)
    seconds = run_benchmark(benchmark, step, device)
    record_train_step(benchmark, seconds, batch * SEQ_LEN, flops_per_token, ceilings, device)
