"""Classify text with a trained classifier:

    tformer classify --checkpoint runs/imdb/export "A wonderful, moving film."
    echo "Two hours I will never get back." | tformer classify --checkpoint runs/imdb

prints one line per text: the label, its probability, and the text. ``--checkpoint`` is an
export folder (``config.json`` + ``model.safetensors``, written by ``tformer/train.py`` at the
end of a run) or a run folder holding ``export/``. The text is prepared exactly as in
training: ``<br />`` cleaned, BPE-encoded, truncated head+tail.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tformer.data.bpe import pad_id
from tformer.data.buckets import pad_batch, truncate_head_tail
from tformer.data.imdb import clean_review
from tformer.optional import require


class TextClassifier:
    """A loaded classifier export: ``predict(texts)`` -> ``[(label, probability, probabilities)]``."""

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu"):
        from tformer.models.pretrained import CONFIG_NAME, find_export, load_pretrained
        Tokenizer = require("tokenizers", "TextClassifier").Tokenizer

        folder = find_export(checkpoint)
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
