"""enwik8 (the first 10^8 bytes of the English Wikipedia dump of 2006-03-03, Hutter Prize):
download, verify, unzip, split 90M/5M/5M bytes (the customary split of Al-Rfou et al., 2018
and Transformer-XL), memory-map.

Verification: the unzipped file must be exactly ``expected_size`` bytes (10^8) with the SHA-1
``expected_sha1`` that Matt Mahoney publishes for it on http://mattmahoney.net/dc/textdata.html
(the file, not the zip, is pinned: any faithful re-packaging of the same bytes is accepted);
a zip's member is also read through ``zipfile``, which checks its CRC-32 against the archive.

Every file is written to a temporary name in the target folder and moved into place with
``os.replace``; a ``READY`` marker is written last. A killed or failed preparation therefore
never leaves splits that look complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

OFFICIAL_URL = "http://mattmahoney.net/dc/enwik8.zip"
EXPECTED_SIZE = 100_000_000
EXPECTED_SHA1 = "57b8363b814821dc9d47aa4d41f58733519076b2"  # of the unzipped file (mattmahoney.net)
SPLIT_NAMES = ("train", "val", "test")
READY_MARKER = "READY"


class Enwik8Error(RuntimeError):
    """The archive or file is missing, corrupt or the wrong size."""


def fetch(url: str, destination: Path) -> None:
    """Download ``url`` (http, https or file://) to ``destination``."""
    with urllib.request.urlopen(url) as response, open(destination, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def split_sizes(total: int) -> tuple[int, int, int]:
    """90% / 5% / 5% by position: 90M/5M/5M bytes for the real file."""
    val = total // 20
    return total - 2 * val, val, val


def _copy_hashing(source, destination: Path) -> str:
    """Copy the open binary file ``source`` to ``destination``; return the SHA-1 of the bytes."""
    digest = hashlib.sha1()
    with open(destination, "wb") as out:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _verify(what: str, path: Path, sha1: str, expected_size: int, expected_sha1: str | None) -> None:
    size = path.stat().st_size
    if size != expected_size:
        raise Enwik8Error(f"enwik8: {what} has {size} bytes, expected {expected_size}")
    if expected_sha1 is not None and sha1 != expected_sha1.lower():
        raise Enwik8Error(f"enwik8: {what} has SHA-1 {sha1}, expected {expected_sha1} (not the official enwik8; "
                          f"delete it and download again)")


def _unzip_member(archive: Path, destination: Path, expected_size: int, expected_sha1: str | None) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            names = [n for n in zipped.namelist() if not n.endswith("/")]
            if names != ["enwik8"]:
                raise Enwik8Error(f"enwik8: {archive} should hold one member 'enwik8', holds {names}")
            # Reading through ZipFile.open checks the CRC-32 at the end of the member.
            with zipped.open("enwik8") as member:
                sha1 = _copy_hashing(member, destination)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as error:
        if isinstance(error, Enwik8Error):
            raise
        raise Enwik8Error(f"enwik8: {archive} is not a valid zip archive ({error}); delete it and download again") from None
    _verify(f"the file unzipped from {archive}", destination, sha1, expected_size, expected_sha1)


def prepare_enwik8(data_dir: str | os.PathLike, source: str | os.PathLike | None = None, *,
                   expected_size: int = EXPECTED_SIZE, expected_sha1: str | None = EXPECTED_SHA1,
                   fetcher=fetch) -> Path:
    """Make ``data_dir/{train,val,test}.bin`` (raw bytes) and return ``data_dir``.

    ``source``: None downloads ``OFFICIAL_URL``; a URL downloads it; a local path may be the
    zip or the unzipped ``enwik8`` file. Already prepared folders (``READY`` present) are reused.
    ``expected_size`` and ``expected_sha1`` (None: size only) exist so tests can use a small
    archive with the same structure.
    """
    data_dir = Path(data_dir).expanduser()
    if (data_dir / READY_MARKER).is_file():
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".enwik8-tmp-") as scratch:
        scratch = Path(scratch)
        raw = scratch / "enwik8"
        source_text = str(source) if source is not None else OFFICIAL_URL
        if "://" in source_text:
            archive = scratch / "enwik8.zip"
            try:
                fetcher(source_text, archive)
            except OSError as error:
                raise Enwik8Error(f"enwik8: could not download {source_text}: {error}") from None
            _unzip_member(archive, raw, expected_size, expected_sha1)
        else:
            path = Path(source_text).expanduser()
            if not path.is_file():
                raise Enwik8Error(f"enwik8: argument 'source' must be a URL, the zip or the file, got {source_text!r}")
            if zipfile.is_zipfile(path):
                _unzip_member(path, raw, expected_size, expected_sha1)
            else:
                if path.stat().st_size != expected_size:  # before reading a wrong file through
                    raise Enwik8Error(f"enwik8: {path} has {path.stat().st_size} bytes, expected {expected_size}")
                with open(path, "rb") as source_file:
                    sha1 = _copy_hashing(source_file, raw)
                _verify(str(path), raw, sha1, expected_size, expected_sha1)
        sizes = split_sizes(expected_size)
        with open(raw, "rb") as whole:
            for name, size in zip(SPLIT_NAMES, sizes):
                part = scratch / f"{name}.bin"
                with open(part, "wb") as out:
                    out.write(whole.read(size))
        for name in SPLIT_NAMES:
            os.replace(scratch / f"{name}.bin", data_dir / f"{name}.bin")
        marker = scratch / READY_MARKER
        marker.write_text(json.dumps({"sizes": dict(zip(SPLIT_NAMES, sizes))}))
        os.replace(marker, data_dir / READY_MARKER)
    return data_dir


def load_enwik8(data_dir: str | os.PathLike) -> dict[str, np.memmap]:
    """The prepared splits, memory-mapped read-only as uint8 arrays."""
    data_dir = Path(data_dir).expanduser()
    if not (data_dir / READY_MARKER).is_file():
        raise Enwik8Error(f"enwik8: {data_dir} is not prepared (no {READY_MARKER} marker); run prepare_enwik8 first")
    return {name: np.memmap(data_dir / f"{name}.bin", dtype=np.uint8, mode="r") for name in SPLIT_NAMES}
