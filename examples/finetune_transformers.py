"""Fine-tune a small Hugging Face transformers model with tformer's attention.

A tiny randomly initialized Llama-style model (RoPE, grouped-query attention) learns to
count (each token is the previous one plus one), on left-padded batches, with ``attn_implementation="tformer"``.
Runs on the CPU in seconds (reference backend); on a GPU the same script runs tformer's
Triton/CUDA kernels. ``build_model`` is shared with bench/bench_hf_attention.py, which times
the training step of the same architecture at GPU size against ``attn_implementation="sdpa"``.

    pip install 'tformer[transformers]'
    python examples/finetune_transformers.py [--steps 30] [--backend reference|triton|cuda|auto]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tformer
import tformer.integrations.transformers  # noqa: F401  (registers attn_implementation="tformer")

VOCAB = 32
# Llama-style, grouped-query: the example's tiny model, and a GPU-sized one for the benchmark
# (head dim 64, 16 query heads sharing 4 key/value heads, ~150M parameters with a 32k vocab).
MODEL_SIZES = {
    "tiny": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096),
}


def build_model(size: str = "tiny", attn_implementation: str = "tformer") -> LlamaForCausalLM:
    """A randomly initialized Llama-style causal LM of ``MODEL_SIZES[size]``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"build_model: argument 'size' must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    return LlamaForCausalLM(LlamaConfig(**MODEL_SIZES[size], attn_implementation=attn_implementation))


def make_batch(batch_size: int, seq_len: int, generator: torch.Generator):
    """Counting sequences (1..VOCAB-1, wrapping) from random starts, left-padded (token 0)."""
    starts = torch.randint(0, VOCAB - 1, (batch_size, 1), generator=generator)
    ids = (starts + torch.arange(seq_len)) % (VOCAB - 1) + 1
    attention_mask = torch.ones_like(ids)
    for row, pad in enumerate(torch.randint(0, seq_len // 2, (batch_size,), generator=generator).tolist()):
        ids[row] = torch.cat([torch.zeros(pad, dtype=ids.dtype), ids[row, :seq_len - pad]])
        attention_mask[row, :pad] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)  # no loss on padding
    return ids, attention_mask, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--backend", default=None, help="tformer backend (default: tformer's default, 'auto')")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model("tiny", "tformer").to(device)
    print(f"attn_implementation={model.config._attn_implementation!r} on {device}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    start = time.perf_counter()
    with tformer.backend(args.backend or tformer.default_backend()):
        for step in range(1, args.steps + 1):
            ids, attention_mask, labels = (t.to(device) for t in make_batch(args.batch_size, args.seq_len, generator))
            loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == 1 or step % 10 == 0 or step == args.steps:
                print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
