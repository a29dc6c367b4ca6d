"""CoNLL-2003 / IOB2 column files for named-entity recognition: read, validate, align to sub-words.

Format (Tjong Kim Sang and De Meulder 2003): one token per line, columns separated by
whitespace, the word first and the tag last (``EU NNP B-NP B-ORG`` or just ``EU B-ORG``);
a blank line ends a sentence; ``-DOCSTART-`` lines separate documents and are skipped. Every
token line of a file must have the same number of columns.

Tags are ``O``, ``B-<type>`` or ``I-<type>``. ``scheme="iob2"`` (the default; what
most corpora on disk use) requires every entity to begin with ``B-``; ``scheme="iob1"`` (the
original CoNLL-2003 files) lets ``I-`` begin one, and converts to IOB2 on reading. Every error
names the file and line.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

IGNORE_INDEX = -100  # label of sub-tokens after a word's first, and of padding: no loss, no metric
SCHEMES = ("iob2", "iob1")
_TAG = re.compile(r"^(?:O|([BI])-(\S+))$")


class ConllFormatError(ValueError):
    """A CoNLL file that breaks the format; the message names the file and line."""


@dataclass
class Sentence:
    """One sentence: words and their IOB2 tags (same length)."""

    words: list[str]
    tags: list[str]


def read_conll(path: str | os.PathLike, *, scheme: str = "iob2", entity_types: Sequence[str] | None = None
               ) -> list[Sentence]:
    """Read and validate a CoNLL file; tags come back in IOB2.

    Args:
        path: the file.
        scheme: ``"iob2"`` (an ``I-X`` must follow ``B-X`` or ``I-X``) or ``"iob1"``.
        entity_types: when given, a tag of another type is an error (e.g. ``("PER", "LOC", "ORG", "MISC")``).

    Raises:
        FileNotFoundError: no such file. ConllFormatError: wrong column count, a malformed or
        unknown tag, an ``I-`` without its ``B-`` (IOB2), or no sentence at all.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"read_conll: argument 'scheme' must be one of {SCHEMES}, got {scheme!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_conll: argument 'path' = {str(path)!r} is not a file; expected a CoNLL-2003 / "
                                f"IOB2 column file")
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    columns = None
    for line_number, line in enumerate(_utf8_lines(path), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append(Sentence(words, tags))
                words, tags = [], []
            continue
        where = f"{path}:{line_number}"
        if columns is None:
            if len(fields) < 2:
                raise ConllFormatError(f"{where}: a token line needs at least 2 columns (word ... tag), got "
                                       f"{len(fields)}: {line.rstrip()!r}")
            columns = len(fields)
        elif len(fields) != columns:
            raise ConllFormatError(f"{where}: expected {columns} columns like the file's first token line, got "
                                   f"{len(fields)}: {line.rstrip()!r}")
        tag = _check_tag(fields[-1], tags[-1] if tags else "O", scheme, entity_types, where)
        words.append(fields[0])
        tags.append(tag)
    if words:
        sentences.append(Sentence(words, tags))
    if not sentences:
        raise ConllFormatError(f"{path}: holds no sentence (no token lines)")
    return sentences


def _utf8_lines(path: Path) -> list[str]:
    """The file's lines, strictly UTF-8; another encoding is a ConllFormatError naming the file,
    line and byte (CoNLL-2003's own files are Latin-1 in places: convert them first)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConllFormatError(f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
                               f"convert the file, e.g. iconv -f latin1 -t utf-8") from None
    return io.StringIO(text, newline=None).readlines()  # universal newlines, as open() reads them


def _check_tag(tag: str, previous: str, scheme: str, entity_types, where: str) -> str:
    match = _TAG.match(tag)
    if match is None:
        raise ConllFormatError(f"{where}: unknown tag {tag!r}; expected O, B-<type> or I-<type>")
    prefix, entity = match.groups()
    if entity is not None and entity_types is not None and entity not in entity_types:
        raise ConllFormatError(f"{where}: unknown entity type in tag {tag!r}; expected one of {list(entity_types)}")
    continues = previous != "O" and previous[2:] == entity
    if prefix == "I" and not continues:
        if scheme == "iob2":
            raise ConllFormatError(f"{where}: tag {tag!r} continues an entity that was never begun (previous tag "
                                   f"{previous!r}); IOB2 needs B-{entity} first (pass scheme='iob1' for the "
                                   f"original CoNLL-2003 files)")
        return f"B-{entity}"  # IOB1 -> IOB2: an I- that starts an entity becomes B-
    return tag


def write_conll(sentences: Sequence[Sentence], path: str | os.PathLike) -> Path:
    """Write ``word tag`` lines, a blank line after each sentence."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for sentence in sentences:
        lines.extend(f"{word} {tag}" for word, tag in zip(sentence.words, sentence.tags))
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tag_names(sentences: Sequence[Sentence]) -> list[str]:
    """The tag vocabulary: ``O`` first, then ``B-X``, ``I-X`` for each type ``X`` in sorted order
    (both prefixes always, so a type seen only as single-word entities can still be tagged)."""
    types = sorted({tag[2:] for sentence in sentences for tag in sentence.tags if tag != "O"})
    return ["O"] + [f"{prefix}-{entity}" for entity in types for prefix in ("B", "I")]


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Per-token labels from per-word labels: a word's first sub-token gets its label, later
    sub-tokens and tokens of no word (``None``) get :data:`IGNORE_INDEX`.

    ``word_ids`` is what HF tokenizers' ``Encoding.word_ids`` gives: for each token, the index
    of the word it came from.
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(IGNORE_INDEX)
        else:
            if not 0 <= word < len(word_labels):
                raise ValueError(f"align_labels: word index {word} is outside the {len(word_labels)} word labels")
            labels.append(word_labels[word])
        previous = word
    return labels
