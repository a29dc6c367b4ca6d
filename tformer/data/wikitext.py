"""WikiText-2 (Merity et al., 2016) from the standard ``wikitext-2-raw-v1`` files given by path:
``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``, at word or character level.

Word level follows the usual language-modelling recipe (the PyTorch ``word_language_model``
example, AWD-LSTM): every line, empty ones included, is split on whitespace and ended with
``<eos>``; the vocabulary is the training split's words (those seen fewer than ``min_count``
times, and words of valid/test never seen in train, become ``<unk>``). Perplexity is then per
word. Character level keeps the text as it is; the character set is taken from all three
files (a closed alphabet, as byte-level enwik8), and bits per character are reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .text import CharVocab
from .word_vocab import EOS, UNK, WordVocab

FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
LEVELS = ("word", "char")


def split_words(text: str) -> list[str]:
    """A file's words, each line (empty ones included) ended with ``<eos>``; a last line without
    its newline is ended too, as the usual recipe reads line by line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def wikitext_files(path: str | os.PathLike) -> dict[str, Path]:
    """The three files of ``path``: the folder that holds them (``wikitext-2-raw/``) or one above it."""
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "wikitext-2-raw"):
        files = {split: candidate / name for split, name in FILES.items()}
        if all(f.is_file() for f in files.values()):
            return files
    raise FileNotFoundError(f"load_wikitext: argument 'path' = {str(folder)!r} must be a folder holding "
                            f"{', '.join(FILES.values())} (the wikitext-2-raw-v1 release, e.g. wikitext-2-raw/)")


def load_wikitext(path: str | os.PathLike, level: str = "word", *, min_count: int = 1):
    """``(splits, vocab)``: ``splits`` maps "train", "val" and "test" to id arrays (uint16, or
    uint32 for vocabularies past 65,535), ``vocab`` a :class:`WordVocab` or
    :class:`~tformer.data.text.CharVocab`."""
    if level not in LEVELS:
        raise ValueError(f"load_wikitext: argument 'level' must be one of {LEVELS}, got {level!r}")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"load_wikitext: argument 'min_count' must be a positive int, got {min_count!r}")
    texts = {split: file.read_text(encoding="utf-8") for split, file in wikitext_files(path).items()}
    if level == "word":
        tokens = {split: split_words(text) for split, text in texts.items()}
        vocab = WordVocab.from_tokens(tokens["train"], min_count)
        ids = {split: [vocab.index.get(t, 0) for t in words] for split, words in tokens.items()}
    else:
        vocab = CharVocab.from_text("".join(texts.values()))
        ids = {split: vocab.encode(text) for split, text in texts.items()}
    dtype = np.uint16 if vocab.size <= 65536 else np.uint32
    return {split: np.array(values, dtype=dtype) for split, values in ids.items()}, vocab
