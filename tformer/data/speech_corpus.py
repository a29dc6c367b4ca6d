"""Build the synthetic speech corpus: real sentences (lines of Tiny Shakespeare) spoken by
Debian's ``espeak-ng`` in several voices, speeds and pitches, with added noise, split by voice.

    python -m tformer.data.speech_corpus --out ~/.cache/tformer/speech_espeak

What it is: formant-synthesized (not recorded) English speech of real text. A "voice" is an
espeak-ng accent plus a voice variant (``en-gb-scotland+m3``); the val and test voices are
never heard in training, and the three splits speak disjoint sentences. Each utterance gets a
random speed (words per minute), pitch and white noise at a random SNR, then is resampled to
16 kHz mono 16-bit WAV.

The output folder holds ``wav/<split>/<id>.wav``, ``manifest.jsonl`` (one row per utterance with
its sha256) and ``corpus.json`` (the build parameters, written last: a folder without it, or
with other parameters, is rebuilt). :func:`verify_corpus` rechecks every checksum.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tformer.optional import require

from .speech import SAMPLE_RATE, normalize_text

TRAIN_VOICES = ("en-us+m1", "en-us+f2", "en-gb+m3", "en-gb+f1", "en-gb-scotland+m2", "en-gb-x-rp+f3",
                "en-029+m4", "en-us-nyc+f4", "en-gb-x-gbclan+m5", "en-gb-x-gbcwmd+f5")
VAL_VOICES = ("en-gb-x-rp+m7",)
TEST_VOICES = ("en-us+f4", "en-gb-scotland+f2")


@dataclass
class CorpusSpec:
    """What to build. Sentences per voice; the sentence pool is Tiny Shakespeare's lines of
    ``min_chars``..``max_chars`` characters after normalization."""

    train_per_voice: int = 200
    val_per_voice: int = 40
    test_per_voice: int = 40
    min_chars: int = 12
    max_chars: int = 36
    speed_range: tuple[int, int] = (140, 200)  # espeak-ng -s, words per minute
    pitch_range: tuple[int, int] = (30, 70)  # espeak-ng -p, 0..99
    snr_db_range: tuple[float, float] = (15.0, 35.0)
    seed: int = 0
    voices: dict = field(default_factory=lambda: {"train": list(TRAIN_VOICES), "val": list(VAL_VOICES),
                                                  "test": list(TEST_VOICES)})


def check_espeak() -> str:
    """The espeak-ng executable, or a clear error saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("speech corpus: the 'espeak-ng' program is not installed; install it with "
                           "'apt-get install -y espeak-ng' (Debian/Ubuntu)")
    return path


def shakespeare_sentences(min_chars: int, max_chars: int) -> list[str]:
    """Distinct normalized lines of the shipped Tiny Shakespeare within the length range, in
    file order."""
    from tformer.data.text import tiny_shakespeare_path

    seen, sentences = set(), []
    for line in Path(tiny_shakespeare_path()).read_text().splitlines():
        text = normalize_text(line)
        if min_chars <= len(text) <= max_chars and " " in text and text not in seen:
            seen.add(text)
            sentences.append(text)
    return sentences


def synthesize(text: str, voice: str, speed: int, pitch: int, snr_db: float, noise_seed: int) -> np.ndarray:
    """espeak-ng -> float32 16 kHz waveform with white noise at ``snr_db``."""
    import io

    librosa, soundfile = require("librosa", "the speech corpus"), require("soundfile", "the speech corpus")
    result = subprocess.run([check_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                            check=True, capture_output=True)
    audio, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE)
    power = float(np.mean(audio ** 2)) + 1e-12
    noise = np.random.default_rng(noise_seed).standard_normal(audio.shape).astype(np.float32)
    audio = audio + noise * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio / max(1.0, float(np.abs(audio).max()))).astype(np.float32)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_corpus(out_dir: str | Path, spec: CorpusSpec | None = None, *, progress: bool = True,
                 workers: int = 4) -> Path:
    """Build the corpus into ``out_dir`` unless it already holds one built from ``spec``."""
    soundfile = require("soundfile", "the speech corpus")
    spec = spec or CorpusSpec()
    out_dir = Path(out_dir).expanduser()
    wanted = json.loads(json.dumps(asdict(spec)))  # tuples as lists, as read back
    marker = out_dir / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == wanted:
        return out_dir
    check_espeak()
    sentences = shakespeare_sentences(spec.min_chars, spec.max_chars)
    rng = random.Random(spec.seed)
    rng.shuffle(sentences)
    per_voice = {"train": spec.train_per_voice, "val": spec.val_per_voice, "test": spec.test_per_voice}
    needed = sum(per_voice[split] * len(voices) for split, voices in spec.voices.items())
    if needed > len(sentences):
        raise ValueError(f"build_corpus: the spec needs {needed} distinct sentences, Tiny Shakespeare has "
                         f"{len(sentences)} in {spec.min_chars}..{spec.max_chars} characters")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    # Every random choice is drawn here, in order, so the corpus does not depend on the threads.
    jobs, cursor = [], 0
    for split in ("train", "val", "test"):
        (out_dir / "wav" / split).mkdir(parents=True, exist_ok=True)
        for voice in spec.voices[split]:
            for _ in range(per_voice[split]):
                jobs.append({"split": split, "path": str(Path("wav") / split / f"{len(jobs):05d}.wav"),
                             "text": sentences[cursor], "voice": voice, "speed": rng.randint(*spec.speed_range),
                             "pitch": rng.randint(*spec.pitch_range),
                             "snr_db": round(rng.uniform(*spec.snr_db_range), 2), "noise_seed": rng.getrandbits(32)})
                cursor += 1

    def make(job: dict) -> dict:
        audio = synthesize(job["text"], job["voice"], job["speed"], job["pitch"], job["snr_db"], job["noise_seed"])
        soundfile.write(str(out_dir / job["path"]), audio, SAMPLE_RATE, subtype="PCM_16")
        return {**job, "num_samples": len(audio), "sha256": _sha256(out_dir / job["path"])}

    # espeak-ng runs as a subprocess and soxr releases the GIL: threads overlap them.
    rows = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for row in pool.map(make, jobs):
            rows.append(row)
            if progress and len(rows) % 200 == 0:
                print(f"speech corpus: {len(rows)}/{needed} utterances", flush=True)
    (out_dir / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"spec": wanted, "utterances": {s: sum(r["split"] == s for r in rows) for s in per_voice},
               "manifest_sha256": _sha256(out_dir / "manifest.jsonl")}
    marker.write_text(json.dumps(summary, indent=2))
    return out_dir


def verify_corpus(out_dir: str | Path) -> None:
    """Raise if a file listed in the manifest is missing or its sha256 differs."""
    out_dir = Path(out_dir).expanduser()
    summary = json.loads((out_dir / "corpus.json").read_text())
    if _sha256(out_dir / "manifest.jsonl") != summary["manifest_sha256"]:
        raise ValueError(f"verify_corpus: {out_dir / 'manifest.jsonl'} does not match corpus.json's checksum")
    for line in (out_dir / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        path = out_dir / row["path"]
        if not path.is_file() or _sha256(path) != row["sha256"]:
            raise ValueError(f"verify_corpus: {path} is missing or its sha256 differs from the manifest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="~/.cache/tformer/speech_espeak", help="corpus folder")
    parser.add_argument("--train-per-voice", type=int, default=CorpusSpec.train_per_voice)
    parser.add_argument("--verify", action="store_true", help="recheck every file's sha256 after building")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_per_voice < 1:
        parser.error(f"argument --train-per-voice must be >= 1, got {args.train_per_voice}")
    try:
        out = build_corpus(args.out, CorpusSpec(train_per_voice=args.train_per_voice))
    except RuntimeError as error:
        parser.error(str(error))
    if args.verify:
        verify_corpus(out)
    print(out)


if __name__ == "__main__":
    main()
