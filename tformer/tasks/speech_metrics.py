"""Character and word error rates with ``jiwer`` (edit distance over characters / words,
divided by the reference length), as edit counts that can be summed over ranks."""

from __future__ import annotations

from typing import Sequence

from tformer.optional import require


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, int]:
    """``{"char_errors", "chars", "word_errors", "words"}``: substitutions + deletions +
    insertions and reference lengths, at the character and word level."""
    jiwer = require("jiwer", "error_counts")
    if len(references) != len(hypotheses):
        raise ValueError(f"error_counts: got {len(references)} references and {len(hypotheses)} hypotheses")
    if not references:
        return {"char_errors": 0, "chars": 0, "word_errors": 0, "words": 0}
    if any(not ref.strip() for ref in references):
        raise ValueError("error_counts: every reference must have at least one word (an empty reference has no "
                         "error rate)")
    chars = jiwer.process_characters(list(references), list(hypotheses))
    words = jiwer.process_words(list(references), list(hypotheses))
    return {"char_errors": chars.substitutions + chars.deletions + chars.insertions,
            "chars": chars.substitutions + chars.deletions + chars.hits,
            "word_errors": words.substitutions + words.deletions + words.insertions,
            "words": words.substitutions + words.deletions + words.hits}


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """``{"cer", "wer"}`` over the whole list (total edits / total reference length)."""
    counts = error_counts(references, hypotheses)
    return {"cer": counts["char_errors"] / max(counts["chars"], 1),
            "wer": counts["word_errors"] / max(counts["words"], 1)}
