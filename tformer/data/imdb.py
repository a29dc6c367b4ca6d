"""The Large Movie Review Dataset v1.0 (Maas et al., 2011): download, verify, read, split.

Layout (official ``aclImdb_v1.tar.gz`` and its labelled-only copies alike)::

    aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt    25,000 + 25,000 reviews, balanced
    aclImdb/train/unsup/<id>_0.txt                       50,000 unlabelled (optional)

``load_imdb`` takes the ``.tar.gz`` itself, the extracted ``aclImdb/`` directory, or a
directory holding either. Archives are read by streaming their members, not extracted:
reading the 30-84 MB archive once takes ~3 s, while extracting writes 100,000 small files
(200+ MB) that must then be kept consistent with the archive; streaming also reads every
byte, so gzip's CRC and the tar structure are checked on every load and a truncated or
corrupt archive fails loudly instead of yielding a silently shorter data set.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

OFFICIAL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# The digest TensorFlow Datasets records for OFFICIAL_URL (84,125,825 bytes). It could not be
# checked here (no network): if the server's file differs, pass sha256=None to skip it and rely on
# the structural checks (gzip CRC, tar integrity, the 12,500-per-class counts) that always run.
OFFICIAL_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
OFFICIAL_PER_CLASS = 12_500  # reviews in each of train/pos, train/neg, test/pos, test/neg

LABEL_NAMES = ("neg", "pos")  # label index = position: 0 negative, 1 positive
LABELED_SPLITS = ("train", "test")
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")
_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]+")


class ImdbDataError(ValueError):
    """The IMDb archive or directory is missing, truncated, corrupt or incomplete."""


@dataclass
class ReviewSet:
    """Reviews of one split, in a fixed order (sorted by label, then review id)."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # 0 neg, 1 pos, -1 unlabelled
    names: list[str] = field(default_factory=list)  # "train/pos/123_9": where the review came from

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "ReviewSet":
        indices = list(indices)
        return ReviewSet([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                         [self.names[i] for i in indices])

    def counts(self) -> dict[str, int]:
        """Reviews per label name, e.g. ``{"neg": 12500, "pos": 12500}``."""
        result: dict[str, int] = {}
        for label in self.labels:
            name = LABEL_NAMES[label] if label >= 0 else "unsup"
            result[name] = result.get(name, 0) + 1
        return result


def clean_review(text: str) -> str:
    """The review as plain text: the ``<br />`` markup the site stored becomes a newline
    (it separates paragraphs), and runs of spaces collapse."""
    text = _LINE_BREAK.sub("\n", text)
    return _SPACES.sub(" ", text).strip()


def load_imdb(source: str | os.PathLike, *, include_unsup: bool = False,
              expected_per_class: int | None = OFFICIAL_PER_CLASS) -> dict[str, ReviewSet]:
    """Read IMDb from ``source`` and return ``{"train": ..., "test": ...}`` (plus ``"unsup"``
    with ``include_unsup`` when the source holds ``train/unsup``).

    ``expected_per_class``: every one of train/pos, train/neg, test/pos, test/neg must hold
    exactly this many reviews (12,500 in the official release); None checks only that none is
    empty (for subsets and the synthetic archives of tests). Texts are cleaned with
    :func:`clean_review`.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"load_imdb: argument 'source' = {str(path)!r} does not exist; expected aclImdb_v1.tar.gz (or a copy "
            f"with the same layout) or its extracted aclImdb/ directory. Get it with "
            f"tformer.data.imdb.download_imdb(dest_dir) from {OFFICIAL_URL}")
    wanted = {"pos", "neg"} | ({"unsup"} if include_unsup else set())
    if path.is_dir():
        records = _read_directory(_find_root(path), wanted)
    else:
        records = _read_archive(path, wanted)
    splits = _group(records)
    _check_counts(path, splits, expected_per_class)
    return splits


def split_validation(train: ReviewSet, size: int | float, seed: int) -> tuple[ReviewSet, ReviewSet]:
    """Carve a validation set from ``train``: ``size`` reviews (an int) or that fraction (a
    float in (0, 1)), drawn with ``seed``. Returns ``(train_rest, validation)``. The draw depends
    only on the seed and the reviews' sorted order, so every copy of the data gives the same split."""
    count = round(size * len(train)) if isinstance(size, float) else size
    if not isinstance(count, int) or not 0 < count < len(train):
        raise ValueError(f"split_validation: argument 'size' = {size!r} must be an int in [1, {len(train) - 1}] "
                         f"or a float fraction in (0, 1) of the {len(train)} training reviews")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    return train.subset(sorted(order[count:])), train.subset(sorted(order[:count]))


def balanced_subset(reviews: ReviewSet, count: int, seed: int) -> ReviewSet:
    """``count`` reviews drawn with ``seed``, as many of each label as possible (for quick runs
    on a fraction of the data); the whole set when ``count >= len(reviews)``."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"balanced_subset: argument 'count' must be a positive int, got {count!r}")
    if count >= len(reviews):
        return reviews
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(reviews.labels):
        by_label.setdefault(label, []).append(index)
    for indices in by_label.values():
        rng.shuffle(indices)
    # Deal labels round-robin so the subset stays balanced.
    chosen, queues = [], [list(v) for _, v in sorted(by_label.items())]
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return reviews.subset(sorted(chosen))


def texts_digest(texts: list[str]) -> str:
    """A sha256 over the texts, in order: the identity of the data a tokenizer was trained on."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def download_imdb(dest_dir: str | os.PathLike, *, url: str = OFFICIAL_URL, sha256: str | None = OFFICIAL_SHA256,
                  expected_per_class: int | None = OFFICIAL_PER_CLASS) -> Path:
    """Download the archive into ``dest_dir`` (once) and return its path.

    The file is written under a temporary name and renamed only after its sha256 (when
    given) and its structure (gzip CRC, tar members, per-class counts) check out, so a
    crash or a bad download never leaves a file that a later call would trust.
    """
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / (Path(urllib.request.urlparse(url).path).name or "aclImdb_v1.tar.gz")
    if target.exists():
        _check_sha256(target, sha256)
        return target
    handle, temp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=dest_dir)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        _check_sha256(temp, sha256)
        splits = _group(_read_archive(temp, {"pos", "neg"}))
        _check_counts(temp, splits, expected_per_class)
        os.replace(temp, target)  # atomic on one file system
    finally:
        temp.unlink(missing_ok=True)
    return target


def _check_sha256(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise ImdbDataError(f"download_imdb: {path} has sha256 {digest.hexdigest()}, expected {expected}; the "
                            f"download is corrupt or the file changed upstream (pass sha256=None to rely on the "
                            f"structural checks only)")


def _find_root(path: Path) -> Path:
    """The ``aclImdb`` directory: ``path`` itself or its child."""
    for candidate in (path, path / "aclImdb"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise ImdbDataError(f"load_imdb: directory {str(path)!r} holds neither train/ and test/ nor aclImdb/train and "
                        f"aclImdb/test; expected the extracted aclImdb_v1.tar.gz")


def _parse_name(name: str):
    """``(split, label_dir, id, rating)`` for a review path, else None."""
    match = _MEMBER.search(name.replace(os.sep, "/"))
    if match is None:
        return None
    split, label_dir, review_id, rating = match.groups()
    return split, label_dir, int(review_id), int(rating)


def _decode(raw: bytes, name: str) -> str:
    if not raw.strip():
        raise ImdbDataError(f"load_imdb: review {name} is empty")
    if b"\x00" in raw:
        raise ImdbDataError(f"load_imdb: review {name} looks binary (it holds NUL bytes); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ImdbDataError(f"load_imdb: review {name} is not valid UTF-8 ({error})") from error


def _read_archive(path: Path, wanted: set[str]) -> list[tuple]:
    records = []
    try:
        # One streaming pass through gzip.GzipFile rather than tarfile's "r|gz": tarfile's own
        # decompressor takes a stream cut at a member boundary for the end of the archive,
        # while GzipFile raises EOFError on a missing end-of-stream marker and checks the
        # CRC-32 and length trailer.
        with gzip.open(path, "rb") as compressed:
            with tarfile.open(fileobj=compressed, mode="r|") as archive:
                for member in archive:
                    parsed = _parse_name(member.name) if member.isfile() else None
                    if parsed is None or parsed[1] not in wanted:
                        continue
                    raw = archive.extractfile(member).read()
                    records.append((*parsed, _decode(raw, member.name)))
            # tarfile stops at the end-of-archive blocks; read on so gzip reaches and checks its trailer.
            while compressed.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ImdbDataError(f"load_imdb: archive {str(path)!r} is truncated or corrupt ({type(error).__name__}: "
                            f"{error}) after {len(records)} reviews; download it again") from error
    return records


def _read_directory(root: Path, wanted: set[str]) -> list[tuple]:
    records = []
    for split in LABELED_SPLITS:
        for label_dir in sorted(wanted):
            folder = root / split / label_dir
            if not folder.is_dir():
                continue
            for file in folder.iterdir():
                parsed = _parse_name(str(file.relative_to(root.parent)))
                if parsed is not None:
                    records.append((*parsed, _decode(file.read_bytes(), str(file))))
    return records


def _group(records: list[tuple]) -> dict[str, ReviewSet]:
    splits: dict[str, ReviewSet] = {}
    for split, label_dir, review_id, rating, text in sorted(records, key=lambda r: r[:3]):
        key = "unsup" if label_dir == "unsup" else split
        label = LABEL_NAMES.index(label_dir) if label_dir in LABEL_NAMES else -1
        target = splits.setdefault(key, ReviewSet())
        target.texts.append(clean_review(text))
        target.labels.append(label)
        target.names.append(f"{split}/{label_dir}/{review_id}_{rating}")
    return splits


def _check_counts(path: Path, splits: dict[str, ReviewSet], expected_per_class: int | None) -> None:
    for split in LABELED_SPLITS:
        counts = splits[split].counts() if split in splits else {}
        for label in LABEL_NAMES:
            found = counts.get(label, 0)
            if found == 0 or (expected_per_class is not None and found != expected_per_class):
                expected = expected_per_class if expected_per_class is not None else "at least 1"
                raise ImdbDataError(f"load_imdb: {str(path)!r} holds {found} reviews in {split}/{label}, expected "
                                    f"{expected}; the data set is incomplete (truncated archive or wrong directory)")
