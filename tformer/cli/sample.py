"""``tformer sample``: text from a trained DecoderLM (:mod:`tformer.generation.sampling`).

    tformer sample --checkpoint runs/default/export --prompt "ROMEO:" --max-new-tokens 200

``--checkpoint`` takes an export folder (``model.safetensors`` + ``config.json``), a run folder
(its ``export/``), or a checkpoint folder written during training (its ``export/``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from tformer.generation.sampling import beam_search, generate
from tformer.models.pretrained import find_export


def build_parser(prog: str = "tformer sample") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
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


def main(argv: list[str] | None = None, *, prog: str = "tformer sample") -> None:
    """Sample; user errors raise ``ValueError``/``OSError`` (:func:`tformer.cli.errors.run_cli` prints them)."""
    parser = build_parser(prog)
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
