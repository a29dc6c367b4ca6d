"""Text files as character-level token streams: Tiny Shakespeare (shipped in the package) or
any UTF-8 text file by path, split by position 90/10 into train/validation, as is customary."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

class CharVocab:
    """Characters <-> ids, ids in sorted character order (nanoGPT's ``shakespeare_char``)."""

    kind = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab: argument 'chars' must not repeat a character")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - self.index.keys())
        if missing:
            raise ValueError(f"CharVocab: text holds characters outside the vocabulary: {missing[:10]}")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteVocab:
    """Raw bytes as ids 0..255 (enwik8 is modelled byte by byte; bpc counts bytes)."""

    kind = "byte"
    size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


def vocab_from_dict(values: dict):
    kind = values.get("kind")
    if kind == "char":
        return CharVocab(values["chars"])
    if kind == "byte":
        return ByteVocab()
    if kind == "word":
        from .word_vocab import WordVocab

        return WordVocab(values["words"])
    raise ValueError(f"vocab_from_dict: unknown vocabulary kind {kind!r}, expected 'char', 'byte' or 'word'")


def tiny_shakespeare_path() -> Path:
    """Tiny Shakespeare as shipped in the package (``tformer/assets``)."""
    return Path(str(resources.files("tformer") / "assets" / "tinyshakespeare.txt"))


def read_text_file(path: Path, caller: str) -> str:
    """The UTF-8 text of ``path``; an empty, binary (NUL bytes) or non-UTF-8 file is a
    ``ValueError`` naming the file and what is wrong with it."""
    raw = Path(path).read_bytes()
    if not raw:
        raise ValueError(f"{caller}: {path} is empty; expected UTF-8 text")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{caller}: {path} looks binary (it holds a NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{caller}: {path} is not UTF-8 text (byte {raw[error.start]:#04x} at offset "
                         f"{error.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def load_text_splits(path: str | Path | None = None, val_fraction: float = 0.1):
    """``(splits, vocab)`` for a text file (None: Tiny Shakespeare): ``splits`` maps "train" and
    "val" to uint8/uint16 id arrays, the first ``1 - val_fraction`` of the characters and the rest."""
    path = Path(path).expanduser() if path is not None else tiny_shakespeare_path()
    if not path.is_file():
        raise FileNotFoundError(f"load_text_splits: argument 'path' must be a text file, got {str(path)!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"load_text_splits: argument 'val_fraction' must be in (0, 1), got {val_fraction}")
    text = read_text_file(path, "load_text_splits")
    vocab = CharVocab.from_text(text)
    dtype = np.uint8 if vocab.size <= 256 else np.uint16
    ids = np.array(vocab.encode(text), dtype=dtype)
    cut = int(len(ids) * (1.0 - val_fraction))
    if cut < 2 or len(ids) - cut < 2:
        raise ValueError(f"load_text_splits: {path} has {len(ids)} characters, too few to split")
    return {"train": ids[:cut], "val": ids[cut:]}, vocab
