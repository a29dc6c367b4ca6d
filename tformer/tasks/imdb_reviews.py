"""The IMDb reviews the classify, classify_hf, mlm and multitask tasks read, carved the same way
in each: the archive (downloaded when ``data.path`` is a URL or None), a seeded validation split
carved from train, and balanced limits applied before any tokenizer sees the texts. So a task that
fine-tunes on what another pretrained on sees the same ids and never trains on what it validates on.
"""

from __future__ import annotations

from pathlib import Path

from tformer.data.imdb import (OFFICIAL_URL, ReviewSet, balanced_subset, download_imdb, load_imdb,
                               split_validation)


class ImdbReviews:
    """The splits of ``data`` (a ``ClassifyDataConfig`` or one extending it), read once.

    ``include_unsup`` also keeps ``train/unsup`` when the archive has it; ``keep_test`` False
    drops the test split right after reading (``load_imdb`` still checks its counts). ``load``
    reads the archive (default :func:`tformer.data.imdb.load_imdb`).
    """

    def __init__(self, data, *, include_unsup: bool = False, keep_test: bool = True, load=load_imdb):
        self.data, self.include_unsup, self.keep_test, self.load = data, include_unsup, keep_test, load
        self.splits: dict[str, ReviewSet] | None = None

    def archive_path(self) -> Path:
        """The local archive or directory, downloading it first when ``data.path`` is a URL or None."""
        data = self.data
        source = data.path or OFFICIAL_URL
        if source.startswith(("http://", "https://", "file://")):
            return download_imdb(data.cache_dir, url=source, sha256=data.download_sha256,
                                 expected_per_class=data.expected_per_class)
        return Path(source).expanduser()

    def read(self) -> dict[str, ReviewSet]:
        """``{"train", "val"}`` (+ ``"test"`` when kept, + ``"unsup"`` when asked for and present)."""
        if self.splits is None:
            data = self.data
            splits = self.load(self.archive_path(), include_unsup=self.include_unsup,
                               expected_per_class=data.expected_per_class)
            train, val = split_validation(splits["train"], data.val_size, seed=data.split_seed)
            raw = {"train": train, "val": val}
            limits = {"train": data.train_limit, "val": data.val_limit}
            if self.keep_test:
                raw["test"], limits["test"] = splits["test"], data.test_limit
            # Limits apply before the tokenizer is trained: it learns from the reviews actually used.
            self.splits = {split: balanced_subset(reviews, limits[split], seed=data.split_seed)
                           if limits[split] is not None else reviews for split, reviews in raw.items()}
            if self.include_unsup and "unsup" in splits:
                self.splits["unsup"] = splits["unsup"]
        return self.splits
