"""IMDb data pipeline: reading archives and directories, integrity errors, download, the
validation split, the cached BPE tokenizer, head+tail truncation and length buckets."""

from __future__ import annotations

import hashlib
import random
import statistics

import pytest
import torch
from imdb_synthetic import make_imdb_archive

from tformer.data import bpe
from tformer.data.buckets import LengthBucketBatches, pad_batch, padding_fraction, truncate_head_tail
from tformer.data.imdb import (ImdbDataError, clean_review, download_imdb, load_imdb, split_validation,
                               texts_digest)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz", per_class=20, unsup=5)


def test_reads_archive_with_layout_labels_and_cleaning(archive):
    splits = load_imdb(archive, expected_per_class=20)
    assert set(splits) == {"train", "test"}
    for split in ("train", "test"):
        assert splits[split].counts() == {"neg": 20, "pos": 20}
        for text, label, name in zip(splits[split].texts, splits[split].labels, splits[split].names):
            assert name.startswith(f"{split}/{('neg', 'pos')[label]}/")
            assert "<br" not in text and "\n\n" in text  # the markup became paragraph breaks


def test_unsup_is_optional_material(archive):
    assert load_imdb(archive, expected_per_class=20, include_unsup=True)["unsup"].counts() == {"unsup": 5}


def test_directory_source_matches_archive(archive, tmp_path):
    root = make_imdb_archive(tmp_path, per_class=20, unsup=5, directory=True)
    from_archive = load_imdb(archive, expected_per_class=20)
    for source in (root, root.parent):  # aclImdb/ itself or the folder holding it
        from_directory = load_imdb(source, expected_per_class=20)
        assert from_directory["train"].texts == from_archive["train"].texts
        assert from_directory["test"].names == from_archive["test"].names


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*download_imdb"):
        load_imdb(tmp_path / "nope.tar.gz")
    with pytest.raises(ImdbDataError, match="neither train/ and test/"):
        load_imdb(tmp_path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97, -8])
def test_truncated_archive_is_a_clear_error(archive, tmp_path, keep):
    """Cut anywhere (even just the gzip trailer: -8 bytes), the archive is refused even when the
    per-class counts are not checked."""
    data = archive.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[:keep if keep < 0 else int(len(data) * keep)])
    with pytest.raises(ImdbDataError, match="truncated or corrupt"):
        load_imdb(truncated, expected_per_class=None)


def test_corrupt_archive_is_a_clear_error(archive, tmp_path):
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: a deflate error or a CRC mismatch
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ImdbDataError, match="truncated or corrupt"):
        load_imdb(corrupt, expected_per_class=None)
    (tmp_path / "plain.txt").write_text("not an archive")
    with pytest.raises(ImdbDataError, match="truncated or corrupt"):
        load_imdb(tmp_path / "plain.txt", expected_per_class=None)


def test_wrong_counts_are_reported(archive):
    with pytest.raises(ImdbDataError, match="holds 20 reviews in train/neg, expected 12500"):
        load_imdb(archive)


def test_download_verifies_and_renames_atomically(archive, tmp_path):
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = archive.as_uri()
    with pytest.raises(ImdbDataError, match="has sha256"):
        download_imdb(tmp_path / "bad", url=url, sha256="0" * 64, expected_per_class=20)
    assert list((tmp_path / "bad").iterdir()) == []  # no partial file left behind
    with pytest.raises(ImdbDataError, match="expected 12500"):
        download_imdb(tmp_path / "short", url=url, sha256=sha256)
    assert list((tmp_path / "short").iterdir()) == []
    path = download_imdb(tmp_path / "ok", url=url, sha256=sha256, expected_per_class=20)
    assert path.name == "aclImdb_v1.tar.gz" and path.read_bytes() == archive.read_bytes()
    # A second call finds the verified file and fetches nothing (the URL would fail).
    assert download_imdb(tmp_path / "ok", url="file:///nonexistent/aclImdb_v1.tar.gz", sha256=sha256) == path


def test_clean_review():
    assert clean_review("Good.<br /><br />Very  good.<BR/>End<br>") == "Good.\n\nVery good.\nEnd"


def test_validation_split_is_seeded_and_disjoint(archive):
    train = load_imdb(archive, expected_per_class=20)["train"]
    rest, val = split_validation(train, 0.25, seed=3)
    assert len(val) == 10 and len(rest) == 30
    assert not set(rest.names) & set(val.names)
    assert split_validation(train, 10, seed=3)[1].names == val.names
    assert split_validation(train, 10, seed=4)[1].names != val.names
    with pytest.raises(ValueError, match="'size'"):
        split_validation(train, 40, seed=0)


def test_bpe_is_cached_by_settings_and_data(archive, tmp_path):
    texts = load_imdb(archive, expected_per_class=20)["train"].texts
    digest = texts_digest(texts)
    tokenizer, path = bpe.load_or_train_bpe(texts, 300, tmp_path, data_digest=digest)
    assert bpe.pad_id(tokenizer) == 0 and tokenizer.get_vocab_size() <= 300
    ids = bpe.encode(tokenizer, ["A wonderful movie.\nGreat!"])[0]
    assert tokenizer.decode(ids).strip() == "A wonderful movie.\nGreat!"  # byte level: lossless
    again, same_path = bpe.load_or_train_bpe(texts, 300, tmp_path, data_digest=digest)
    assert same_path == path and again.to_str() == tokenizer.to_str()
    assert bpe.load_or_train_bpe(texts, 320, tmp_path, data_digest=digest)[1] != path
    assert bpe.load_or_train_bpe(texts[:-1], 300, tmp_path, data_digest=texts_digest(texts[:-1]))[1] != path
    assert not list(tmp_path.glob("*.part"))
    with pytest.raises(ValueError, match="'vocab_size'"):
        bpe.train_bpe(texts, 100)


def test_truncate_head_tail():
    ids = list(range(10))
    assert truncate_head_tail(ids, 4, 1) == [0, 7, 8, 9]
    assert truncate_head_tail(ids, 4, 4) == [0, 1, 2, 3]
    assert truncate_head_tail(ids, 4, 0) == [6, 7, 8, 9]
    assert truncate_head_tail(ids, 12, 3) == ids
    with pytest.raises(ValueError, match="'head'"):
        truncate_head_tail(ids, 4, 5)


def test_length_buckets_cover_everything_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    sampler = LengthBucketBatches(lengths, 16, shuffle=True, seed=1, pool_batches=20)
    batches = sampler.batches(epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == len(sampler) == 63
    assert sampler.batches(epoch=0) == batches and sampler.batches(epoch=1) != batches
    random_batches = [list(range(i, min(i + 16, 1000))) for i in range(0, 1000, 16)]
    assert padding_fraction(lengths, batches) < 0.1 < 0.3 < padding_fraction(lengths, random_batches)
    evaluation = LengthBucketBatches(lengths, 16, shuffle=False).batches()
    assert [len(b) for b in evaluation] == [16] * 62 + [8]
    dropped = LengthBucketBatches(lengths, 16, shuffle=True, drop_last=True).batches(0)
    assert {len(b) for b in dropped} == {16} and len(dropped) >= 60
    # Within a batch the lengths are close: the median spread is a small fraction of the range.
    assert statistics.median(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) < 30


def test_pad_batch_builds_the_key_padding_mask():
    tokens, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, pad_to_multiple=4)
    assert tokens.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[False, False, False, True], [False, True, True, True]]
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert pad_batch([[1] * 9], pad_id=0, pad_to_multiple=8, extra_positions=1)[0].shape == (1, 15)  # 1 + 15 = 16
    assert pad_batch([[1] * 7], pad_id=0, pad_to_multiple=8, extra_positions=1)[0].shape == (1, 7)
    assert pad_batch([[1] * 9], pad_id=0, pad_to_multiple=8, max_width=10)[0].shape == (1, 10)  # model's limit
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_batch([[1], []], pad_id=0)
