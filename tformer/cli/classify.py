"""``tformer classify``: labels for texts from a trained classifier (:mod:`tformer.generation.classify`).

    tformer classify --checkpoint runs/imdb/export "A wonderful, moving film."
    echo "Two hours I will never get back." | tformer classify --checkpoint runs/imdb

prints one line per text: the label, its probability, and the text. ``--checkpoint`` is an
export folder (``config.json`` + ``model.safetensors``, written by ``tformer train`` at the
end of a run) or a run folder holding ``export/``. The text is prepared exactly as in
training: ``<br />`` cleaned, BPE-encoded, truncated head+tail.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tformer.generation.classify import TextClassifier


def build_parser(prog: str = "tformer classify") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export folder (config.json + model.safetensors) or "
                                                            "the run folder holding export/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("texts", nargs="*", help="texts to classify; none: one text per line on stdin")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "tformer classify") -> int:
    """Classify; user errors raise ``ValueError``/``OSError`` (:func:`tformer.cli.errors.run_cli` prints them)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    texts = args.texts or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        parser.error("no text given (pass texts as arguments or on stdin)")
    classifier = TextClassifier(args.checkpoint, device=args.device)
    for text, (label, probability, _) in zip(texts, classifier.predict(texts)):
        preview = text if len(text) <= 80 else text[:77] + "..."
        print(f"{label}\t{probability:.4f}\t{preview}")
    return 0
