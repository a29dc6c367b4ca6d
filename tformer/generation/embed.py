"""Semantic search over a file's lines with a sentence encoder: what ``tformer embed`` runs
(:mod:`tformer.cli.embed` describes the command)."""

from __future__ import annotations

from pathlib import Path

import torch

PROGRESS_MIN_LINES = 256  # below this many lines a progress bar is noise


def rank(query_embedding: torch.Tensor, embeddings: torch.Tensor, top_k: int) -> list[tuple[int, float]]:
    """``[(row, cosine)]`` of the ``top_k`` rows of ``embeddings (N, D)`` closest to ``query_embedding (D,)``."""
    scores = torch.nn.functional.cosine_similarity(embeddings, query_embedding[None, :], dim=-1)
    values, rows = scores.topk(min(top_k, len(scores)))
    return list(zip(rows.tolist(), values.tolist()))


def read_lines_text(path: Path) -> str:
    """``path``'s text, strictly UTF-8: a binary file or another encoding is refused with the
    file and the offending byte's place, never turned into U+FFFD junk that would be ranked."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"FILE {str(path)!r} looks binary (a NUL byte at offset {data.index(0)}); embed reads "
                         f"UTF-8 text, one candidate per line")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"FILE {str(path)!r} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                         f"{error.start}, line {line}); convert it, e.g. iconv -f latin1 -t utf-8") from None
