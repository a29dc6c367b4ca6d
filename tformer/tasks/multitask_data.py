"""The data of the multi-task task: which task reads what, the tokenizer they share, and each
split encoded for its head.

* ``sentiment`` (classification): IMDb review -> neg/pos.
* ``rating`` (regression): the same IMDb review -> its 1-10 star rating, from the file name
  ``<id>_<rating>.txt`` (the labelled reviews hold 1-4 and 7-10 only).
* ``ner`` (token classification): CoNLL-2003 / IOB2 sentences, from ``data.ner_path`` or the
  generated SYNTHETIC corpus (``data.ner_synthetic``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tformer.data import bpe
from tformer.data.buckets import truncate_head_tail
from tformer.data.conll import IGNORE_INDEX, Sentence, align_labels, read_conll
from tformer.data.imdb import ReviewSet, texts_digest

# task name -> the head kind its data trains
TASK_KINDS = {"sentiment": "classification", "rating": "regression", "ner": "token_classification"}
IMDB_TASKS = ("sentiment", "rating")
# File names of a CoNLL folder, per split: the usual train/valid/test, or CoNLL-2003's eng.train/testa/testb.
CONLL_FILES = {"train": ("train.txt", "eng.train"), "val": ("valid.txt", "dev.txt", "eng.testa"),
               "test": ("test.txt", "eng.testb")}


@dataclass
class EncodedSplit:
    """Token ids per example and the target of one task: an int class, a float score, or a list of
    per-token tag ids (:data:`IGNORE_INDEX` on sub-tokens after a word's first)."""

    ids: list[list[int]]
    targets: list


def review_ratings(reviews: ReviewSet) -> list[float]:
    """The star rating of each review, from its name ``split/label/<id>_<rating>``."""
    return [float(name.rsplit("_", 1)[1]) for name in reviews.names]


def find_conll_file(folder: str | Path, split: str) -> Path:
    folder = Path(folder).expanduser()
    for name in CONLL_FILES[split]:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"data.ner_path = {str(folder)!r} holds none of {list(CONLL_FILES[split])} for the "
                            f"{split} split")


def tokenizer_texts(reviews: ReviewSet | None, sentences: list[Sentence] | None) -> list[str]:
    """What the shared BPE is trained on: the training reviews and the training sentences."""
    texts = list(reviews.texts) if reviews is not None else []
    return texts + ([" ".join(s.words) for s in sentences] if sentences is not None else [])


def train_tokenizer(texts: list[str], data_config):
    return bpe.load_or_train_bpe(texts, data_config.bpe_vocab_size, data_config.cache_dir,
                                 data_digest=texts_digest(texts), min_frequency=data_config.bpe_min_frequency)[0]


def encode_reviews(tokenizer, reviews: ReviewSet, max_tokens: int, head_tokens: int, pad_id: int) -> list[list[int]]:
    return [truncate_head_tail(row, max_tokens, head_tokens) or [pad_id]
            for row in bpe.encode(tokenizer, reviews.texts)]


def encode_sentences(tokenizer, sentences: list[Sentence], tag_ids: dict[str, int], max_tokens: int) -> EncodedSplit:
    """Each sentence's words tokenized separately (a word never shares a token with its
    neighbour), labelled on their first sub-token, cut to ``max_tokens`` tokens."""
    ids, targets = [], []
    encodings = tokenizer.encode_batch([s.words for s in sentences], is_pretokenized=True, add_special_tokens=False)
    for sentence, encoding in zip(sentences, encodings):
        unknown = [tag for tag in sentence.tags if tag not in tag_ids]
        if unknown:
            raise ValueError(f"ner: tag {unknown[0]!r} is not in the training data's tag set {sorted(tag_ids)}")
        labels = align_labels(encoding.word_ids, [tag_ids[tag] for tag in sentence.tags])
        ids.append(encoding.ids[:max_tokens])
        targets.append(labels[:max_tokens])
    return EncodedSplit(ids, targets)


def word_tags(labels: list[int], predicted: list[int], names: list[str]) -> tuple[list[str], list[str]]:
    """The true and predicted tags of the words kept (each word's first sub-token)."""
    kept = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    return [names[labels[i]] for i in kept], [names[predicted[i]] for i in kept]


def load_ner_split(data_config, split: str, seed: int) -> list[Sentence]:
    """A split of the NER corpus: read from ``data.ner_path`` or generated (SYNTHETIC)."""
    if data_config.ner_synthetic:
        from tformer.data.synthetic_ner import synthetic_ner_corpus

        count = data_config.ner_synthetic_train if split == "train" else data_config.ner_synthetic_eval
        return synthetic_ner_corpus(count, seed=f"{data_config.split_seed}:{split}")
    return read_conll(find_conll_file(data_config.ner_path, split), scheme=data_config.ner_scheme)
