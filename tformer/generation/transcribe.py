"""Transcription with a trained speech recognizer: what ``tformer transcribe`` runs
(:mod:`tformer.cli.transcribe` says what it does with long and short audio)."""

from __future__ import annotations

from pathlib import Path


from tformer.optional import require



def read_audio(path: Path, sample_rate: int):
    """Mono float32 waveform of ``path`` at ``sample_rate``."""
    librosa, soundfile = require("librosa", "reading audio"), require("soundfile", "reading audio")
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    return librosa.resample(audio, orig_sr=rate, target_sr=sample_rate) if rate != sample_rate else audio


def max_chunk_samples(model) -> int:
    """The most samples one encoder pass takes: ``max_source_len`` positions after the speech
    front end's x4 subsampling of ``samples // hop + 1`` frames (see ``SpeechEmbedding``)."""
    hop = model.source_embedding.log_mel.hop_length
    return (4 * model.config.max_source_len - 4) * hop


def chunks(audio, limit: int) -> list:
    """``audio`` cut into the fewest equal pieces of at most ``limit`` samples."""
    count = -(-len(audio) // limit)
    size = -(-len(audio) // count)
    return [audio[start:start + size] for start in range(0, len(audio), size)]
