"""Speech recognition data: the character vocabulary, text normalization, and reading a corpus
built by :mod:`tformer.data.speech_corpus` (a manifest of 16 kHz mono WAV files and their
transcripts)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tformer.optional import require

SAMPLE_RATE = 16000
# Transcripts are lower-case letters, apostrophe and space: punctuation is not spoken.
CHARACTERS = " 'abcdefghijklmnopqrstuvwxyz"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # PAD doubles as the CTC blank (it never is a target)
SPECIALS = ("<pad>", "<bos>", "<eos>")


class AsrVocab:
    """Characters of :data:`CHARACTERS` after the three special ids."""

    def __init__(self, characters: str = CHARACTERS):
        self.characters = characters
        self.index = {char: i + len(SPECIALS) for i, char in enumerate(characters)}

    @property
    def size(self) -> int:
        return len(SPECIALS) + len(self.characters)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"AsrVocab: argument 'text' has characters {unknown} outside the vocabulary "
                             f"{self.characters!r} (normalize_text first)")
        return [self.index[char] for char in text]

    def decode(self, ids) -> str:
        return "".join(self.characters[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))

    def to_dict(self) -> dict:
        return {"kind": "asr_chars", "characters": self.characters}

    @classmethod
    def from_dict(cls, values: dict) -> AsrVocab:
        if values.get("kind") != "asr_chars":
            raise ValueError(f"AsrVocab.from_dict: expected kind 'asr_chars', got {values.get('kind')!r}")
        return cls(values["characters"])


def normalize_text(text: str) -> str:
    """Lower-case, keep letters and apostrophes, turn everything else into single spaces."""
    text = re.sub(r"[^a-z']+", " ", text.lower())
    return re.sub(r" +", " ", text).strip(" ")


def read_manifest(corpus_dir: str | Path, split: str) -> list[dict]:
    """The manifest rows of ``split`` ("train", "val", "test"): dicts with ``path`` (relative to
    the corpus), ``text``, ``voice``, ``speed``, ``pitch``, ``num_samples``, ``sha256``."""
    corpus_dir = Path(corpus_dir)
    manifest = corpus_dir / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"read_manifest: {manifest} does not exist; build the corpus with "
                                f"python -m tformer.data.speech_corpus --out {corpus_dir}")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["split"] == split]


def load_split(corpus_dir: str | Path, split: str, limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """``(waveforms, transcripts)`` of ``split``: float32 arrays in [-1, 1] at 16 kHz."""
    soundfile = require("soundfile", "load_split")
    rows = read_manifest(corpus_dir, split)[:limit]
    waveforms = []
    for row in rows:
        audio, rate = soundfile.read(str(Path(corpus_dir) / row["path"]), dtype="float32")
        if rate != SAMPLE_RATE:
            raise ValueError(f"load_split: {row['path']} is sampled at {rate} Hz, expected {SAMPLE_RATE}")
        waveforms.append(audio)
    return waveforms, [row["text"] for row in rows]
