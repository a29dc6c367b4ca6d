"""The speech front end (log-mel against librosa, SpecAugment, the x4 subsampling stem) and
the espeak-ng corpus builder."""

import json

import numpy as np
import pytest
import torch

from tformer.data.speech import AsrVocab, load_split, normalize_text, read_manifest
from tformer.data.speech_corpus import build_corpus, verify_corpus
from tformer.nn.speech import LogMel, SpeechEmbedding, spec_augment

from speech_helpers import TINY_SPEC, requires_espeak


def test_log_mel_of_a_sine_matches_librosa():
    # Plain implementation: librosa's melspectrogram of a 440 Hz sine (float64). librosa comes with
    # the speech extra; without it only this comparison skips, not the rest of the file.
    librosa = pytest.importorskip("librosa", reason="librosa is the speech extra: pip install -e '.[speech]'")
    rate, seconds = 16000, 0.5
    t = np.arange(int(rate * seconds)) / rate
    wave = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    expected = librosa.feature.melspectrogram(y=wave.astype(np.float64), sr=rate, n_fft=400, hop_length=160,
                                              n_mels=40, center=True, pad_mode="constant", power=2.0)
    # Check results: the torch path in float32, on the mel power and on the log.
    log_mel = LogMel(sample_rate=rate, n_fft=400, hop_length=160, n_mels=40)
    power = log_mel.power_mel(torch.from_numpy(wave)[None])[0].double()
    assert power.shape == expected.shape
    torch.testing.assert_close(power, torch.from_numpy(expected), rtol=1e-4, atol=1e-4 * expected.max())
    logs = log_mel(torch.from_numpy(wave)[None])[0].T.double()
    torch.testing.assert_close(logs, torch.log(torch.from_numpy(expected) + 1e-6), rtol=0, atol=2e-3)
    # The 440 Hz channel carries the energy.
    assert int(power.mean(dim=1).argmax()) == int(np.argmax(expected.mean(axis=1)))


def test_spec_augment_masks_bands_and_spans():
    features = torch.randn(3, 100, 40)
    masked = spec_augment(features, freq_masks=2, freq_width=8, time_masks=2, time_width_fraction=0.1,
                          generator=torch.Generator().manual_seed(0))
    changed = masked != features
    assert changed.any() and not changed.all()
    assert torch.equal(spec_augment(features, freq_masks=0, freq_width=8, time_masks=0, time_width_fraction=0.1),
                       features)


def test_speech_embedding_subsamples_by_four_and_ignores_padding():
    torch.manual_seed(0)
    stem = SpeechEmbedding(32, n_mels=40, channels=8).eval()
    waves = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 9000])
    hidden, padding = stem(waves, lengths)
    frames = 16000 // 160 + 1
    assert hidden.shape == (2, (frames + 3) // 4, 32)
    assert padding.sum(dim=1).tolist() == [0, hidden.shape[1] - ((9000 // 160 + 1) + 3) // 4]
    alone, _ = stem(waves[1:, :9000], lengths[1:])
    torch.testing.assert_close(hidden[1:, :alone.shape[1]], alone, atol=1e-4, rtol=1e-4)
    stem.train()
    assert not torch.equal(stem(waves, lengths)[0], hidden)  # SpecAugment is on in training


def test_text_normalization_and_vocab():
    assert normalize_text("KING RICHARD III: Now is the winter-- of our discontent!") == \
        "king richard iii now is the winter of our discontent"
    vocab = AsrVocab()
    assert vocab.decode(vocab.encode("o'er the hill")) == "o'er the hill"
    with pytest.raises(ValueError, match="normalize_text"):
        vocab.encode("Hi!")


@requires_espeak
def test_corpus_is_built_cached_checksummed_and_split_by_voice(tmp_path):
    out = build_corpus(tmp_path / "corpus", TINY_SPEC, progress=False)
    verify_corpus(out)
    rows = {split: read_manifest(out, split) for split in ("train", "val", "test")}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    voices = {split: {row["voice"] for row in rows[split]} for split in rows}
    assert not voices["train"] & (voices["val"] | voices["test"])
    texts = {split: {row["text"] for row in rows[split]} for split in rows}
    assert not texts["train"] & (texts["val"] | texts["test"])
    waves, transcripts = load_split(out, "train")
    assert all(w.dtype == np.float32 and len(w) > 4000 and np.abs(w).max() <= 1.0 for w in waves)
    assert transcripts == [row["text"] for row in rows["train"]]
    # Cached: a second build with the same spec leaves the files alone.
    stamp = (out / "corpus.json").stat().st_mtime_ns
    build_corpus(out, TINY_SPEC, progress=False)
    assert (out / "corpus.json").stat().st_mtime_ns == stamp
    # A corrupted file is caught.
    first = out / rows["train"][0]["path"]
    first.write_bytes(first.read_bytes()[:-2] + b"\x00\x01")
    with pytest.raises(ValueError, match="sha256"):
        verify_corpus(out)
    assert json.loads((out / "corpus.json").read_text())["utterances"] == {"train": 6, "val": 2, "test": 2}
