"""Classify text with a trained classifier:

    python -m tformer.classify --checkpoint runs/imdb/export "A wonderful, moving film."
    echo "Two hours I will never get back." | python -m tformer.classify --checkpoint runs/imdb

prints one line per text: the label, its probability, and the text. ``--checkpoint`` is an
export folder (``config.json`` + ``model.safetensors``, written by ``tformer/train.py`` at the
end of a run) or a run folder holding ``export/``. The text is prepared exactly as in
training: ``<br />`` cleaned, BPE-encoded, truncated head+tail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tformer.data.bpe import pad_id
from tformer.data.buckets import pad_batch, truncate_head_tail
from tformer.data.imdb import clean_review
from tformer.optional import require


class TextClassifier:
    """A loaded classifier export: ``predict(texts)`` -> ``[(label, probability, probabilities)]``."""

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu"):
        from tformer.models.pretrained import CONFIG_NAME, load_pretrained
        Tokenizer = require("tokenizers", "TextClassifier").Tokenizer

        folder = resolve_export_dir(checkpoint)
        self.model, metadata = load_pretrained(folder, device=device)
        for key in ("labels", "tokenizer", "max_tokens", "head_tokens"):
            if key not in metadata:
                raise ValueError(f"classify: {folder / CONFIG_NAME} has no metadata[{key!r}]; it was not exported by "
                                 f"the 'classify' task")
        self.labels = list(metadata["labels"])
        self.tokenizer = Tokenizer.from_str(json.dumps(metadata["tokenizer"]))
        self.max_tokens, self.head_tokens = int(metadata["max_tokens"]), int(metadata["head_tokens"])
        self.device = torch.device(device)

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as in training: cleaned, BPE-encoded, truncated head+tail."""
        encodings = self.tokenizer.encode_batch([clean_review(t) for t in texts], add_special_tokens=False)
        return [truncate_head_tail(e.ids, self.max_tokens, self.head_tokens) or [self.pad_id] for e in encodings]

    @torch.no_grad()
    def predict(self, texts: list[str]) -> list[tuple[str, float, list[float]]]:
        tokens, key_padding_mask = pad_batch(self.encode(texts), self.pad_id, device=self.device)
        probabilities = self.model(tokens, key_padding_mask=key_padding_mask).float().softmax(dim=-1).cpu()
        results = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append((self.labels[best], row[best], row))
        return results


def resolve_export_dir(checkpoint: str | Path) -> Path:
    """``checkpoint`` itself when it holds ``config.json``, else its ``export/`` folder."""
    folder = Path(checkpoint).expanduser()
    for candidate in (folder, folder / "export"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"classify: argument '--checkpoint' = {str(folder)!r} holds no config.json (nor "
                            f"export/config.json); expected the export folder written at the end of a training run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tformer.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export folder (config.json + model.safetensors) or "
                                                            "the run folder holding export/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("texts", nargs="*", help="texts to classify; none: one text per line on stdin")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Classify; user errors raise ``ValueError``/``OSError`` (wrap with :func:`tformer.cli_errors.run_cli`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    texts = args.texts or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        parser.error("no text given (pass texts as arguments or on stdin)")
    classifier = TextClassifier(args.checkpoint, device=args.device)
    for text, (label, probability, _) in zip(texts, classifier.predict(texts)):
        preview = text if len(text) <= 80 else text[:77] + "..."
        print(f"{label}\t{probability:.4f}\t{preview}")
    return 0


if __name__ == "__main__":
    from tformer.cli_errors import run_cli

    sys.exit(run_cli(main))
