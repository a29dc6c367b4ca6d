"""Small synthetic IMDb archives with the official layout, for tests that must not depend on
the real 30 MB archive: reviews are neutral filler words plus a few sentiment words, with the
site's ``<br />`` markup, so a tiny model can learn them in seconds."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

FILLER = ("the movie film plot actor scene story director camera music script time people character "
          "ending minute about with this that was it and of a to in").split()
POSITIVE = "great wonderful brilliant loved excellent superb moving beautiful".split()
NEGATIVE = "awful boring terrible hated waste dull stupid worst".split()


def synthetic_review(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(8, 40))]
    cues = POSITIVE if positive else NEGATIVE
    for _ in range(rng.randint(2, 4)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(cues))
    middle = len(words) // 2
    return " ".join(words[:middle]) + ".<br /><br />" + " ".join(words[middle:]) + "."


def make_imdb_archive(path: Path, per_class: int, *, seed: int = 0, unsup: int = 0, directory: bool = False) -> Path:
    """Write ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` (+ ``train/unsup``) with
    ``per_class`` reviews each, as a ``.tar.gz`` at ``path`` or, with ``directory``, as an
    extracted tree under ``path``."""
    rng = random.Random(seed)
    files: dict[str, str] = {"aclImdb/README": "synthetic\n", "aclImdb/imdb.vocab": "the\nmovie\n"}
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            for review_id in range(per_class):
                rating = rng.randint(7, 10) if label == "pos" else rng.randint(1, 4)
                files[f"aclImdb/{split}/{label}/{review_id}_{rating}.txt"] = synthetic_review(rng, label == "pos")
    for review_id in range(unsup):
        files[f"aclImdb/train/unsup/{review_id}_0.txt"] = synthetic_review(rng, rng.random() < 0.5)
    if directory:
        for name, text in files.items():
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        return path / "aclImdb"
    names = list(files)
    rng.shuffle(names)  # member order in real archives is arbitrary
    with tarfile.open(path, "w:gz") as archive:
        for name in names:
            data = files[name].encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
