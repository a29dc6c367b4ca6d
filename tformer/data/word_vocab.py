"""A word vocabulary for word-level language modelling (WikiText)."""

from __future__ import annotations

import collections

EOS, UNK = "<eos>", "<unk>"


class WordVocab:
    """Words <-> ids; id 0 is ``<unk>``, id 1 ``<eos>`` (a line break), then the training words by
    falling frequency (ties alphabetical, so the ids never depend on dict order)."""

    kind = "word"

    def __init__(self, words: list[str]):
        if words[:2] != [UNK, EOS] or len(set(words)) != len(words):
            raise ValueError("WordVocab: argument 'words' must start with '<unk>', '<eos>' and not repeat a word")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_tokens(cls, tokens: list[str], min_count: int = 1) -> "WordVocab":
        counts = collections.Counter(t for t in tokens if t not in (UNK, EOS))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([UNK, EOS, *kept])

    @property
    def size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        # Each line break is one <eos>, wherever it falls in the prompt.
        return [self.index.get(token, 0) for token in text.replace("\n", f" {EOS} ").split()]

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids).replace(f" {EOS} ", "\n").replace(EOS, "\n")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "words": self.words}
