"""Text generation from a trained DecoderLM, with the KV cache: temperature, top-k, top-p
(nucleus, Holtzman et al., 2020), greedy decoding and beam search.

    python -m tformer.sample --checkpoint runs/default/export --prompt "ROMEO:" --max-new-tokens 200

``--checkpoint`` takes an export folder (``model.safetensors`` + ``config.json``), a run folder
(its ``export/``), or a checkpoint folder written during training (its ``export/``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from tformer.models import KVCache


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the smallest set whose
    probability reaches ``top_p``; logits ``(B, V)``."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"filter_logits: argument 'top_k' must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"filter_logits: argument 'top_p' must be in (0, 1] (or None), got {top_p}")
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (so the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, greedy: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``(B, V)``: the argmax when ``greedy``, else a
    sample from ``softmax(filter_logits(logits / temperature))``. Returns ``(B, 1)`` int64.
    Shared by the LM's :func:`generate` and the encoder-decoder's decoding
    (:mod:`tformer.generation.seq2seq`)."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"pick_next_tokens: argument 'temperature' must be > 0 (or use greedy=True), got {temperature}")
    probs = torch.softmax(filter_logits(logits / temperature, top_k=top_k, top_p=top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             generator: torch.Generator | None = None, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` ``(B, T0)`` by ``max_new_tokens``; returns ``(B, T0 + N)``.

    The prompt runs once through the model filling the KV cache; each new token then costs one
    single-position forward pass. Past the model's ``max_seq_len`` the context slides: when the
    cache is full it restarts from the last ``max_seq_len // 2`` tokens (one prefill per half
    window, so the cost stays linear). ``cache_dtype``: the dtype keys and values are computed in
    (under autocast or FSDP2 mixed precision it differs from the parameters'); default: the
    parameters' dtype.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: argument 'prompt_ids' must be (B, T0) with T0 >= 1, got {tuple(prompt_ids.shape)}")
    total = _check_prompt_fits("generate", model, prompt_ids, max_new_tokens)
    if not greedy and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"generate: argument 'temperature' must be > 0 (or use greedy=True), got {temperature}")
    was_training = model.training
    model.eval()
    cache = KVCache.for_model(model, prompt_ids.shape[0], max_seq_len=min(total, model.config.max_seq_len),
                              dtype=cache_dtype)
    out = prompt_ids
    logits = model(prompt_ids, cache=cache)[:, -1, :].float()
    for step in range(max_new_tokens):
        next_ids = pick_next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                    generator=generator)
        out = torch.cat([out, next_ids], dim=1)
        if step + 1 < max_new_tokens:
            logits = _next_logits(model, out, cache)
    model.train(was_training)
    return out


@torch.no_grad()
def beam_search(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, num_beams: int = 4,
                length_penalty: float = 0.0) -> torch.Tensor:
    """The highest-scoring continuation of one prompt ``(1, T0)`` under beam search; returns
    ``(1, T0 + N)``. Score = sum of log-probabilities / N**length_penalty (all beams have the
    same length here, so the penalty only matters when comparing across lengths; kept for API
    symmetry). Beams share one KV cache of batch ``num_beams``, reordered each step."""
    if num_beams < 1:
        raise ValueError(f"beam_search: argument 'num_beams' must be >= 1, got {num_beams}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"beam_search: argument 'prompt_ids' must be (1, T0), got {tuple(prompt_ids.shape)}")
    total = _check_prompt_fits("beam_search", model, prompt_ids, max_new_tokens)
    was_training = model.training
    model.eval()
    beams = prompt_ids.repeat(num_beams, 1)
    cache = KVCache.for_model(model, num_beams, max_seq_len=min(total, model.config.max_seq_len))
    log_probs = torch.log_softmax(model(beams, cache=cache)[:, -1, :].float(), dim=-1)
    # Only the first beam is live at the start, so the first step does not pick duplicates.
    scores = torch.full((num_beams,), float("-inf"), device=beams.device)
    scores[0] = 0.0
    vocab = log_probs.shape[-1]
    for step in range(max_new_tokens):
        candidates = (scores[:, None] + log_probs).reshape(-1)
        scores, flat = torch.topk(candidates, num_beams)
        origin, token = flat // vocab, flat % vocab
        beams = torch.cat([beams[origin], token[:, None]], dim=1)
        cache.reorder(origin)
        if step + 1 < max_new_tokens:
            log_probs = torch.log_softmax(_next_logits(model, beams, cache), dim=-1)
    best = torch.argmax(scores / max(max_new_tokens, 1) ** length_penalty)
    model.train(was_training)
    return beams[best:best + 1]


def _check_prompt_fits(caller: str, model, prompt_ids: torch.Tensor, max_new_tokens: int) -> int:
    if prompt_ids.shape[1] > model.config.max_seq_len:
        raise ValueError(f"{caller}: the prompt ({prompt_ids.shape[1]} tokens) is longer than the model's "
                         f"max_seq_len={model.config.max_seq_len}")
    if max_new_tokens < 0:
        raise ValueError(f"{caller}: argument 'max_new_tokens' must be >= 0, got {max_new_tokens}")
    return prompt_ids.shape[1] + max_new_tokens


def _next_logits(model, sequences: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits after the last token of ``sequences`` (B, T), whose earlier tokens are cached.
    A full cache restarts from the last half window: the model has no positions past
    max_seq_len (a learned table), and sliding by one would cost a prefill per token."""
    if cache.length < cache.max_seq_len:
        return model(sequences[:, -1:], cache=cache)[:, -1, :].float()
    cache.reset()
    return model(sequences[:, -max(cache.max_seq_len // 2, 1):], cache=cache)[:, -1, :].float()


def find_export(path: str | Path) -> Path:
    """The folder holding ``model.safetensors`` for an export, run or checkpoint folder."""
    path = Path(path).expanduser()
    for candidate in (path, path / "export"):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"sample: argument '--checkpoint' must be a folder with model.safetensors and config.json "
                            f"(an export, or a run/checkpoint folder with export/), got {str(path)!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tformer.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="export, run or checkpoint folder")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=200, help=">= 0")
    parser.add_argument("--num-samples", type=int, default=None, help=">= 1 (default 1)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="finite, >= 0; 0 means greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help=">= 1: keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="in (0, 1]: nucleus sampling")
    parser.add_argument("--greedy", action="store_true", help="argmax at every step")
    parser.add_argument("--beams", type=int, default=None, help=">= 1: beam search with this many beams (one output)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag values generation cannot honour, and flags that another flag makes ineffective."""
    def bad(flag, value, expected):
        parser.error(f"argument {flag}: must be {expected}, got {value}")

    if args.max_new_tokens < 0:
        bad("--max-new-tokens", args.max_new_tokens, ">= 0")
    if args.num_samples is not None and args.num_samples < 1:
        bad("--num-samples", args.num_samples, ">= 1")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        bad("--temperature", args.temperature, "a finite number >= 0 (0 means greedy)")
    if args.top_k is not None and args.top_k < 1:
        bad("--top-k", args.top_k, ">= 1")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        bad("--top-p", args.top_p, "in (0, 1]")
    if args.beams is not None:
        if args.beams < 1:
            bad("--beams", args.beams, ">= 1")
        sampling = [flag for flag, value in (("--num-samples", args.num_samples), ("--temperature", args.temperature),
                                             ("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
                    if value is not None] + (["--greedy"] if args.greedy else [])
        if sampling:
            parser.error(f"argument --beams: beam search is deterministic and returns one output; "
                         f"{', '.join(sampling)} would have no effect")
    elif args.greedy or args.temperature == 0:
        ignored = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
                   if value is not None]
        if ignored:
            parser.error(f"argument {'--greedy' if args.greedy else '--temperature 0'}: greedy decoding takes the "
                         f"argmax; {', '.join(ignored)} would have no effect")


def main(argv=None) -> None:
    """Sample; user errors raise ``ValueError``/``OSError`` (wrap with :func:`tformer.cli_errors.run_cli`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    from tformer.models.pretrained import load_pretrained

    export = find_export(args.checkpoint)
    model, metadata = load_pretrained(export, device=args.device)
    from tformer.data.text import vocab_from_dict
    from tformer.models import DecoderLM

    if not isinstance(model, DecoderLM):
        task = json.loads((Path(export) / "config.json").read_text()).get("task")
        hint = "; use tformer transcribe for speech" if task == "asr" else ""
        raise ValueError(f"sample: argument --checkpoint: {export} holds a {type(model).__name__} (task {task!r}), "
                         f"not a language model (task 'lm'){hint}")

    vocab = vocab_from_dict(metadata["vocab"])
    try:
        prompt = vocab.encode(args.prompt) or [0]
    except ValueError as error:
        raise ValueError(f"sample: argument --prompt={args.prompt!r} cannot be encoded: {error}") from None
    prompt_ids = torch.tensor([prompt], dtype=torch.long, device=args.device)
    max_new = args.max_new_tokens
    if args.beams is not None:
        outputs = beam_search(model, prompt_ids, max_new, num_beams=args.beams)
    else:
        temperature = 0.8 if args.temperature is None else args.temperature
        generator = torch.Generator(device=args.device).manual_seed(args.seed or 0)
        outputs = generate(model, prompt_ids.repeat(args.num_samples or 1, 1), max_new,
                           temperature=temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                           greedy=args.greedy or temperature == 0, generator=generator)
    for index, row in enumerate(outputs):
        if index:
            print("-" * 40)
        print(vocab.decode(row.tolist()))


if __name__ == "__main__":
    from tformer.cli_errors import run_cli

    run_cli(main)
