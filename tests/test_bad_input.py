"""Bad input to tformer's commands ends as one ``error:`` line naming the file, argument or
value (exit 2), or as the right behaviour (long audio transcribed in chunks, a warning and exit
status 1 for audio too short, a plot that skips a damaged last metrics line), never as a
traceback or a silently wrong result."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tformer.cli.errors import run_cli
from tformer.models import DecoderLM, ModelConfig
from tformer.models.pretrained import save_pretrained
from tformer.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


def one_error_line(capsys, exit_info) -> str:
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- exports to feed the commands

@pytest.fixture(scope="module")
def lm_export(tmp_path_factory) -> Path:
    from tformer.data.text import CharVocab

    folder = tmp_path_factory.mktemp("lm") / "export"
    vocab = CharVocab(sorted(set("hello world")))
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=vocab.size, max_seq_len=16, d_model=16, n_layers=1, n_heads=2))
    save_pretrained(model, folder, task="lm", metadata={"vocab": vocab.to_dict()})
    return folder


@pytest.fixture(scope="module")
def asr_export(tmp_path_factory) -> Path:
    """An untrained speech recognizer whose encoder takes at most 8 positions (about 0.2 s)."""
    pytest.importorskip("librosa")
    from tformer.data.speech import BOS_ID, EOS_ID, SAMPLE_RATE, AsrVocab
    from tformer.models import EncoderDecoderConfig, EncoderDecoderTransformer

    folder = tmp_path_factory.mktemp("asr") / "export"
    vocab = AsrVocab()
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(EncoderDecoderConfig(
        vocab_size=vocab.size, max_seq_len=8, d_model=16, n_heads=2, n_layers=1, n_encoder_layers=1, n_mels=16,
        conv_channels=4, max_source_len=8, backend="reference"))
    save_pretrained(model, folder, task="asr", metadata={"vocab": vocab.to_dict(), "sample_rate": SAMPLE_RATE,
                                                         "bos_id": BOS_ID, "eos_id": EOS_ID, "max_text_len": 6})
    return folder


def write_wav(path: Path, samples: int) -> Path:
    soundfile = pytest.importorskip("soundfile")
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, samples).astype("float32")
    soundfile.write(str(path), audio, 16000, subtype="PCM_16")
    return path


# ----------------------------------------------------------------------------- transcribe

def test_long_audio_is_transcribed_in_chunks_and_short_audio_warns(asr_export, tmp_path, capsys):
    """5 s of audio against an 8-position encoder: cut into chunks that fit, not an error that
    drops the files after it. 0 frames and 5 samples: a warning each, an empty line, exit 1."""
    from tformer.cli.transcribe import main as transcribe

    long = write_wav(tmp_path / "long.wav", 5 * 16000)
    empty = write_wav(tmp_path / "empty.wav", 0)
    tiny = write_wav(tmp_path / "tiny.wav", 5)
    normal = write_wav(tmp_path / "normal.wav", 3000)
    with pytest.raises(SystemExit) as exit_info:
        transcribe(["--checkpoint", str(asr_export), str(long), str(empty), str(tiny), str(normal)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert len(captured.out.split("\n")) == 5  # four lines, one per file, the normal one after the others
    assert "empty.wav: 0 samples" in captured.err and "tiny.wav: 5 samples" in captured.err
    assert "2 of 4 files were too short" in captured.err and "Traceback" not in captured.err


def test_transcribe_chunks_fit_the_encoder(asr_export):
    from tformer.generation.transcribe import chunks, max_chunk_samples
    from tformer.models.pretrained import load_pretrained

    model, _ = load_pretrained(asr_export)
    limit = max_chunk_samples(model)
    pieces = chunks(np.zeros(5 * 16000, dtype="float32"), limit)
    assert sum(len(p) for p in pieces) == 5 * 16000 and max(len(p) for p in pieces) <= limit
    longest = torch.zeros(1, limit)
    model.encode(longest, torch.tensor([limit]))  # fits
    with pytest.raises(ValueError, match="max_source_len"):
        model.encode(torch.zeros(1, limit + 4 * 160), torch.tensor([limit + 4 * 160]))


def test_sample_on_a_speech_export_names_the_task(asr_export, capsys):
    from tformer.cli.sample import main as sample

    with pytest.raises(SystemExit) as exit_info:
        run_cli(sample, ["--checkpoint", str(asr_export)])
    err = one_error_line(capsys, exit_info)
    assert "EncoderDecoderTransformer (task 'asr'), not a language model" in err and "transcribe" in err


# ----------------------------------------------------------------------------- embed

def test_embed_on_a_language_model_export_names_it(lm_export, tmp_path, capsys):
    from tformer.cli.embed import main as embed

    lines = tmp_path / "lines.txt"
    lines.write_text("a film\nanother film\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(embed, ["--model", str(lm_export), "--query", "film", str(lines)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "DecoderLM (task 'lm'), not a text encoder" in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    (b"\x7fELF\x02\x01\x00\x00binary" * 10, r"looks binary \(a NUL byte at offset 6\)"),
    ("caf\u00e9\nna\u00efve\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 3, line 1\)"),
    (b"fine line\nnul\x00inside\n", r"looks binary \(a NUL byte at offset 13\)"),
], ids=["binary", "latin1", "nul"])
def test_embed_refuses_a_file_that_is_not_utf8_text(tmp_path, capsys, content, message):
    from tformer.cli.embed import main as embed

    path = tmp_path / "lines.txt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(embed, ["--model", "unused", "--query", "film", str(path)])
    err = one_error_line(capsys, exit_info)
    assert str(path) in err
    import re

    assert re.search(message, err), err


def _python_m(command: str, *argv: str) -> subprocess.CompletedProcess:
    """``python -m tformer COMMAND ARGV...``"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tformer", command, *argv], capture_output=True, text=True, env=env,
                          cwd=REPO / "tests", timeout=120)


@pytest.mark.slow
def test_python_m_entry_points_end_in_a_transcript_or_one_error_line(asr_export, tmp_path):
    """The ``python -m tformer transcribe`` / ``python -m tformer embed`` forms: long
    audio is transcribed, a bad file is one error line; no traceback."""
    result = _python_m("transcribe", "--checkpoint", str(asr_export),
                       str(write_wav(tmp_path / "long.wav", 3 * 16000)))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stdout.split("\n")) == 2
    (tmp_path / "binary").write_bytes(b"\x00\x01")
    result = _python_m("embed", "--query", "x", str(tmp_path / "binary"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: FILE '{tmp_path / 'binary'}' looks binary (a NUL byte at "
                                                  f"offset 0); embed reads UTF-8 text, one candidate per line"]


# ----------------------------------------------------------------------------- visualize

def test_attention_of_a_multitask_export_runs_its_trunk(tmp_path):
    from imdb_synthetic import synthetic_review
    from tformer.data.bpe import train_bpe
    from tformer.models.multitask import MultiTaskConfig, MultiTaskModel
    from tformer.cli import visualize as cli

    rng = random.Random(0)
    tokenizer = train_bpe([synthetic_review(rng, i % 2 == 0) for i in range(100)], 300)
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(vocab_size=tokenizer.get_vocab_size(), max_seq_len=32, d_model=16,
                                           n_layers=2, n_heads=2, heads={"sentiment": {"kind": "classification"}}))
    save_pretrained(model, tmp_path / "export", task="multitask",
                    metadata={"tokenizer": json.loads(tokenizer.to_str()), "max_tokens": 32, "head_tokens": 8})
    out = tmp_path / "attention.png"
    assert cli.main(["attention", "--checkpoint", str(tmp_path / "export"), "--text", "a great film",
                     "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_curves_skip_a_damaged_last_line_and_refuse_an_empty_file(tmp_path, capsys):
    from tformer.cli import visualize as cli

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": step, "train/loss": 3.0 - 0.1 * step} for step in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(text + '{"step": 6, "train/lo')  # what a kill -9 leaves
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipping line 6, the last, which is damaged"):
        assert cli.main(["curves", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    (run / "metrics.jsonl").write_text('{"step": 1\n' + text)  # damage inside: an error naming the line
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["curves", str(run), "--out", str(tmp_path / "curves.png")])
    assert exit_info.value.code == 2 and "line 1 is not JSON" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["curves", str(run), "--out", str(tmp_path / "empty.png")])
    assert exit_info.value.code == 2 and "holds no metric records" in capsys.readouterr().err
    assert not (tmp_path / "empty.png").exists()


# ----------------------------------------------------------------------------- configs and data

def test_multitask_heads_all_weighted_zero_or_negative_are_refused_by_name():
    from tformer.models.multitask import MultiTaskConfig

    shape = dict(vocab_size=50, max_seq_len=16, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ConfigError, match=r"every head in model.heads \(sentiment, rating\) has weight 0"):
        MultiTaskConfig(**shape, heads={"sentiment": {"kind": "classification", "weight": 0},
                                        "rating": {"kind": "regression", "weight": 0.0}})
    with pytest.raises(ConfigError, match=r"model.heads.rating: head weight must be >= 0.* got -1"):
        MultiTaskConfig(**shape, heads={"sentiment": {"kind": "classification"},
                                        "rating": {"kind": "regression", "weight": -1}})


def test_a_latin1_conll_file_names_the_file_line_and_byte(tmp_path):
    from tformer.data.conll import ConllFormatError, read_conll

    path = tmp_path / "train.txt"
    path.write_bytes("-DOCSTART- O\n\nParis B-LOC\nest O\n\nCaf\u00e9 B-ORG\n".encode("latin-1"))
    with pytest.raises(ConllFormatError, match=rf"{path}:6: not UTF-8 \(byte 0xe9 at offset 36\)"):
        read_conll(path)


def test_an_ablation_grid_with_two_axes_of_one_name_is_refused():
    from tformer.experiments.grid import expand_axes

    axes = [{"name": "norm", "key": "model.norm", "values": ["layernorm", "rmsnorm"]},
            {"name": "norm", "key": "model.dropout", "values": [0.0, 0.1]}]
    with pytest.raises(ConfigError, match=r"axes\[0\] and axes\[1\] are both named 'norm'"):
        expand_axes(axes)


def test_asr_takes_run_epochs(tmp_path):
    from tformer.tasks.asr import AsrTask
    from tformer.training.config import load_config
    from tformer.training.run_length import planned_steps

    from test_two_rank_tasks import write_noise_corpus

    corpus = write_noise_corpus(tmp_path / "speech", {"train": 7, "val": 2, "test": 2})
    config = load_config({"task": "asr", "model": {"d_model": 16, "n_heads": 2},
                          "data": {"corpus_dir": str(corpus)}, "training": {"micro_batch_size": 2},
                          "run": {"epochs": 2, "out_dir": str(tmp_path / "run")}})
    task = AsrTask(config, rank=1, world_size=2)
    task.load_data()
    assert task.steps_per_epoch() == 2  # 4 of the 7 utterances per rank, 2 per micro-batch
    assert planned_steps(config.run, task) == 4


def test_checkpoint_verify_reports_a_killed_save(tmp_path, capsys):
    from tformer.training import checkpoint as ckpt
    from tformer.cli.checkpoint import main as verify
    from tformer.training.config import load_config
    from tformer.training.trainer import Trainer

    from train_helpers import tiny_config

    Trainer(load_config(tiny_config(tmp_path, run={"steps": 2, "checkpoint_interval": 2}))).fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    killed = checkpoints / ckpt.step_dir_name(4)
    killed.mkdir()  # a newer save killed before its COMPLETE marker
    capsys.readouterr()
    assert run_cli(verify, ["verify", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"{killed}: INCOMPLETE: no COMPLETE marker" in out and "continues step_0000002" in out
