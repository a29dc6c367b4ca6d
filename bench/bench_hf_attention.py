"""Training step of a Hugging Face Llama-style model (examples/finetune_transformers.py's
architecture: RoPE, grouped-query attention, causal) with ``attn_implementation="tformer"``
on each tformer backend, against the same model with transformers' ``"sdpa"``, in one run:
tokens/s, MFU and peak memory. Only the attention differs between the rows."""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
from pathlib import Path

import pytest
import torch

import tformer

from bench.candidates import Candidate, candidate_params
from bench.metrics import check_training_works, describe, record_train_step
from bench.shapes import DEVICE, ON_GPU
from bench.timing import run_benchmark

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed (pip install 'tformer[transformers]')", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_transformers.py"
# (model size in the example, batch, sequence length): GPU-sized on a GPU, the tiny model on a CPU.
SIZE, BATCH, SEQ_LEN = ("gpu", 8, 2048) if ON_GPU else ("tiny", 2, 24)
WARMUP_STEPS = 3
LEARNING_RATE = 3e-4
# How far tformer's loss may be from "sdpa"'s on the same weights and batch.
LOSS_TOLERANCE = 2e-2 if ON_GPU else 1e-4


@functools.cache
def _example():
    spec = importlib.util.spec_from_file_location("finetune_transformers", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_backend(name: str):
    return lambda: tformer.backend(name)


CANDIDATES = [Candidate(f"tformer-{name}", "tformer", ("tformer", _with_backend(name)))
              for name in tformer.available_backends()]
CANDIDATES.append(Candidate("hf-sdpa", "anchor", ("sdpa", contextlib.nullcontext)))


def _loss(model, tokens, device) -> torch.Tensor:
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        return model(input_ids=tokens, labels=tokens).loss.float()


def flops_per_token(model, seq_len: int) -> float:
    """6 x the parameters that do matmuls (all but the input embedding) + 12 L d T for attention,
    as ANCHORS.md counts a training step."""
    config = model.config
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


@pytest.mark.parametrize("candidate", candidate_params(CANDIDATES, DEVICE))
def test_hf_train_step(benchmark, candidate, device, ceilings, device_info):
    attn_implementation, backend_context = candidate.call
    example = _example()
    torch.manual_seed(0)
    model = example.build_model(SIZE, attn_implementation).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    # One fixed batch without padding (pure causal): the step's cost does not depend on the
    # data, and repeated steps on it must lower the loss, which the gate below checks.
    tokens = torch.randint(1, model.config.vocab_size, (BATCH, SEQ_LEN), generator=generator, device=device)

    with backend_context():
        # Correctness gate 1: on the same weights, tformer's attention gives "sdpa"'s loss.
        if candidate.kind == "tformer":
            anchor = example.build_model(SIZE, "sdpa").to(device)
            anchor.load_state_dict(model.state_dict())
            with torch.no_grad():
                expected, actual = float(_loss(anchor, tokens, device)), float(_loss(model, tokens, device))
            del anchor
            assert abs(actual - expected) <= LOSS_TOLERANCE, (
                f"{candidate.name}: initial loss {actual:.5f}, attn_implementation='sdpa' {expected:.5f}")

        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda")

        def step():
            loss = _loss(model, tokens, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        # Correctness gate 2: training works: finite losses that go down on the fixed batch.
        losses = [float(step()) for _ in range(WARMUP_STEPS)]
        check_training_works(candidate.name, losses)

        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        describe(benchmark, op="hf_train_step", pass_name="fwd+bwd+adamw", candidate=candidate, suite="hf_llama",
                 shape=(BATCH, SEQ_LEN), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                 device_info=device_info, ceilings=ceilings, check="loss = sdpa's on the same weights; loss "
                 "decreases", max_abs_error=0.0, model=f"llama-{SIZE}", mode="eager", batch=BATCH, seq_len=SEQ_LEN,
                 params=sum(p.numel() for p in model.parameters()), warmup_losses=losses)
        seconds = run_benchmark(benchmark, step, device)
    record_train_step(benchmark, seconds, BATCH * SEQ_LEN, flops_per_token(model, SEQ_LEN), ceilings, device)
