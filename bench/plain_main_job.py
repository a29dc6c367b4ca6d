"""The README's main job (``tformer train --config ds.json``) as a plain PyTorch loop a user would
write: the same model (bench/plain_gpt.py), data (the shipped Tiny Shakespeare, char level, 90/10
split, random windows), batch, AdamW with decay groups, warmup + cosine schedule, clipping,
evaluations, final sample and step count; no tformer import anywhere.

    python -m bench.plain_main_job --steps 600        # prints one JSON line: seconds, losses

``bench/bench_main_job.py`` times it against ``tformer train --config ds.json`` at the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.plain_gpt import PlainGPT, PlainGPTConfig  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "tformer" / "assets" / "tinyshakespeare.txt"
# configs/ds.json
D_MODEL, N_LAYERS, N_HEADS, SEQ_LEN, BATCH = 96, 3, 4, 64, 32
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETAS, CLIP = 4e-3, 4e-4, 30, 0.1, (0.9, 0.99), 1.0
EVAL_INTERVAL, EVAL_BATCHES, FINAL_EVAL_BATCHES, LOG_INTERVAL, SAMPLE_TOKENS = 450, 4, 8, 25, 100


def learning_rate(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    text = TEXT.read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    splits = {"train": ids[:cut], "val": ids[cut:]}
    generator = torch.Generator().manual_seed(args.seed)

    def batch(split):
        data = splits[split]
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=generator)
        window = torch.stack([data[s:s + SEQ_LEN + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    model = PlainGPT(PlainGPTConfig(vocab_size=len(chars), max_seq_len=SEQ_LEN, d_model=D_MODEL,
                                    n_layers=N_LAYERS, n_heads=N_HEADS))
    decay = [p for m in model.modules() if isinstance(m, torch.nn.Linear) for p in [m.weight]]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": rest, "weight_decay": 0.0}], lr=LR, betas=BETAS)

    def loss_of(tokens, targets):
        logits = model(tokens)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(batches):
        model.eval()
        loss = sum(loss_of(*batch("val")).item() for _ in range(batches)) / batches
        model.train()
        return loss

    setup_s = time.perf_counter() - START
    train_losses, val_losses = [], []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps)
        loss = loss_of(*batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % LOG_INTERVAL == 0 or step + 1 == args.steps:
            train_losses.append(loss.item())
        last = step + 1 == args.steps
        if (step + 1) % EVAL_INTERVAL == 0 or last:
            val_losses.append(evaluate(FINAL_EVAL_BATCHES if last else EVAL_BATCHES))
    # The job's final sample: 100 characters from a newline, top-k 40 at temperature 0.8.
    model.eval()
    tokens = torch.tensor([[index["\n"]]])
    with torch.no_grad():
        for _ in range(SAMPLE_TOKENS):
            logits = model(tokens[:, -SEQ_LEN:])[:, -1] / 0.8
            top = torch.topk(logits, 40)
            choice = top.indices.gather(1, torch.multinomial(F.softmax(top.values, -1), 1))
            tokens = torch.cat([tokens, choice], dim=1)
    result = {"seconds": time.perf_counter() - START, "setup_s": setup_s, "steps": args.steps,
              "final_train_loss": train_losses[-1], "final_val_loss": val_losses[-1]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
