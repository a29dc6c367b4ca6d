"""A byte-level BPE tokenizer (GPT-2 style, Sennrich et al. 2016 over bytes) trained with HF
``tokenizers`` and cached on disk under a key made of its settings and the identity of the
text it was trained on, so a changed vocabulary size or training set never reuses a stale file.

Byte level: every string encodes (no unknown token), and the 256 byte symbols are always in
the vocabulary, whatever the training text held.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tformer.optional import require

PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"  # the input of masked-LM pretraining (tformer.tasks.mlm) at the positions to predict
# No CLS token: the encoder prepends its own learned CLS embedding (EncoderClassifier, pooling="cls").
SPECIAL_TOKENS = (PAD_TOKEN, MASK_TOKEN)  # the trainer adds specials first: <pad> is id 0, <mask> id 1
# Bump when the recipe below changes, to invalidate old caches. 2: <mask> added; a version-1 file
# (no <mask>) is never found under a version-2 key, and load_bpe rejects it if named directly.
_FORMAT_VERSION = 2


def _check_vocab_size(vocab_size) -> None:
    minimum = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"bpe: argument 'vocab_size' must be an int >= {minimum} (256 bytes + special tokens), "
                         f"got {vocab_size!r}")


def train_bpe(texts: list[str], vocab_size: int, *, min_frequency: int = 2):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``."""
    _check_vocab_size(vocab_size)
    tk = require("tokenizers", "tformer.data.bpe")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    # add_prefix_space: " great" and "great" at the start of a review get the same tokens.
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                     special_tokens=list(SPECIAL_TOKENS),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def cache_key(vocab_size: int, min_frequency: int, data_digest: str) -> str:
    """A short hash of everything that determines the trained tokenizer."""
    settings = json.dumps({"kind": "byte-level-bpe", "version": _FORMAT_VERSION, "vocab_size": vocab_size,
                           "min_frequency": min_frequency, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def load_or_train_bpe(texts: list[str], vocab_size: int, cache_dir: str | os.PathLike, *, data_digest: str,
                      min_frequency: int = 2):
    """The tokenizer for these settings from ``cache_dir``, trained and saved there on a miss.

    ``data_digest`` identifies ``texts`` (e.g. :func:`tformer.data.imdb.texts_digest`).
    Returns ``(tokenizer, path)``. The file is written to a temporary name and renamed, so
    concurrent or interrupted runs never leave a half-written tokenizer behind.
    """
    _check_vocab_size(vocab_size)
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"bpe-{vocab_size}-{cache_key(vocab_size, min_frequency, data_digest)}.json"
    if path.exists():
        return load_bpe(path), path
    tokenizer = train_bpe(texts, vocab_size, min_frequency=min_frequency)
    save_bpe(tokenizer, path)
    return tokenizer, path


def save_bpe(tokenizer, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        tokenizer.save(temp)
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


def load_bpe(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_bpe: tokenizer file {str(path)!r} does not exist")
    tokenizer = require("tokenizers", "tformer.data.bpe").Tokenizer.from_file(str(path))
    for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"load_bpe: {str(path)!r} lacks the special token {token!r}; it was not made by "
                             f"tformer.data.bpe")
    return tokenizer


def pad_id(tokenizer) -> int:
    return tokenizer.token_to_id(PAD_TOKEN)


def mask_id(tokenizer) -> int:
    """The id of ``<mask>``; a tokenizer without it (made before version 2) is an error."""
    found = tokenizer.token_to_id(MASK_TOKEN)
    if found is None:
        raise ValueError(f"bpe: the tokenizer has no {MASK_TOKEN!r} token; it was made by an older tformer "
                         f"(delete the cached bpe-*.json so it is trained again)")
    return found


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens)."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
