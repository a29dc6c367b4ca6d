"""The enwik8 pipeline end to end on a small archive built here: download (file:// URL and a
monkeypatched fetch), verify, unzip, split 90/5/5, memory-map; corrupt archives fail cleanly."""

import hashlib
import zipfile

import numpy as np
import pytest

from tformer.data import enwik8

SIZE = 2000
PAYLOAD = bytes((i * 7 + 3) % 256 for i in range(SIZE))
SHA1 = hashlib.sha1(PAYLOAD).hexdigest()  # the small archive's file plays the real one's pinned SHA-1


def make_zip(tmp_path, size=SIZE, name="enwik8"):
    payload = bytes((i * 7 + 3) % 256 for i in range(size))
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr(name, payload)
    return archive, payload


def test_download_from_file_url_splits_and_memmaps(tmp_path):
    archive, payload = make_zip(tmp_path)
    out = enwik8.prepare_enwik8(tmp_path / "data", archive.as_uri(), expected_size=SIZE, expected_sha1=SHA1)
    splits = enwik8.load_enwik8(out)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1800, 100, 100]
    assert isinstance(splits["train"], np.memmap)
    assert bytes(np.concatenate([splits["train"], splits["val"], splits["test"]])) == payload
    assert enwik8.split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)


def test_default_source_is_the_official_url(tmp_path):
    archive, _ = make_zip(tmp_path)
    seen = []

    def fake_fetch(url, destination):
        seen.append(url)
        destination.write_bytes(archive.read_bytes())

    enwik8.prepare_enwik8(tmp_path / "data", expected_size=SIZE, expected_sha1=SHA1, fetcher=fake_fetch)
    assert seen == [enwik8.OFFICIAL_URL]
    # Prepared once: a second call reuses the splits without fetching.
    enwik8.prepare_enwik8(tmp_path / "data", expected_size=SIZE, expected_sha1=SHA1, fetcher=fake_fetch)
    assert len(seen) == 1


def test_local_zip_and_unzipped_file(tmp_path):
    archive, payload = make_zip(tmp_path)
    enwik8.prepare_enwik8(tmp_path / "a", archive, expected_size=SIZE, expected_sha1=SHA1)
    raw = tmp_path / "enwik8"
    raw.write_bytes(payload)
    splits = enwik8.load_enwik8(enwik8.prepare_enwik8(tmp_path / "b", raw, expected_size=SIZE, expected_sha1=SHA1))
    assert bytes(splits["test"]) == payload[-100:]


def _assert_nothing_written(folder):
    assert not (folder / enwik8.READY_MARKER).exists()
    assert sorted(p.name for p in folder.iterdir()) == [] if folder.exists() else True


def test_corrupt_archive_is_a_clear_error_and_writes_nothing(tmp_path):
    archive, _ = make_zip(tmp_path)
    data = bytearray(archive.read_bytes())
    data[60] ^= 0xFF  # inside the compressed member: CRC or inflate fails
    archive.write_bytes(bytes(data))
    with pytest.raises(enwik8.Enwik8Error, match="not a valid zip|CRC|enwik8"):
        enwik8.prepare_enwik8(tmp_path / "data", archive.as_uri(), expected_size=SIZE, expected_sha1=SHA1)
    _assert_nothing_written(tmp_path / "data")
    truncated = tmp_path / "trunc.zip"
    truncated.write_bytes(bytes(data[:100]))
    with pytest.raises(enwik8.Enwik8Error):
        enwik8.prepare_enwik8(tmp_path / "data", truncated, expected_size=SIZE, expected_sha1=SHA1)
    _assert_nothing_written(tmp_path / "data")


def test_wrong_size_and_wrong_member(tmp_path):
    archive, _ = make_zip(tmp_path, size=SIZE - 1)
    with pytest.raises(enwik8.Enwik8Error, match=f"expected {SIZE}"):
        enwik8.prepare_enwik8(tmp_path / "data", archive, expected_size=SIZE, expected_sha1=SHA1)
    _assert_nothing_written(tmp_path / "data")
    other, _ = make_zip(tmp_path, name="other")
    with pytest.raises(enwik8.Enwik8Error, match="one member 'enwik8'"):
        enwik8.prepare_enwik8(tmp_path / "data", other, expected_size=SIZE, expected_sha1=SHA1)
    with pytest.raises(enwik8.Enwik8Error, match="not prepared"):
        enwik8.load_enwik8(tmp_path / "data")


def test_same_size_other_bytes_fail_the_sha1_zip_or_file(tmp_path):
    archive, payload = make_zip(tmp_path)
    with pytest.raises(enwik8.Enwik8Error, match=f"SHA-1 {SHA1}, expected {'0' * 40}"):
        enwik8.prepare_enwik8(tmp_path / "data", archive, expected_size=SIZE, expected_sha1="0" * 40)
    _assert_nothing_written(tmp_path / "data")
    raw = tmp_path / "enwik8"
    raw.write_bytes(payload[::-1])
    with pytest.raises(enwik8.Enwik8Error, match="not the official enwik8"):
        enwik8.prepare_enwik8(tmp_path / "data", raw, expected_size=SIZE, expected_sha1=SHA1)
    _assert_nothing_written(tmp_path / "data")


def test_the_official_sha1_is_pinned_by_default():
    import inspect

    from tformer.tasks.lm import LMDataConfig

    official = "57b8363b814821dc9d47aa4d41f58733519076b2"  # http://mattmahoney.net/dc/textdata.html
    assert inspect.signature(enwik8.prepare_enwik8).parameters["expected_sha1"].default == official
    assert LMDataConfig().expected_sha1 == official


def test_trainer_on_enwik8_reports_the_test_split(tmp_path):
    from tformer.training.config import load_config
    from tformer.training.trainer import Trainer

    from train_helpers import tiny_config

    archive, _ = make_zip(tmp_path, size=20_000)
    data = {"source": "enwik8", "path": str(archive), "data_dir": str(tmp_path / "enwik8"), "seq_len": 16,
            "expected_size": 20_000, "expected_sha1": None}
    config = load_config(tiny_config(tmp_path, data=data, run={"steps": 2, "final_eval_batches": None}))
    history = Trainer(config).fit()
    assert {"val/bpc", "test/bpc", "test/ppl"} <= history[-1].keys()
