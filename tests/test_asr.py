"""The asr task: error rates on hand-checked strings, and a tiny run on a few synthesized
utterances that lowers the loss, evaluates CER/WER, exports and transcribes."""

import pytest
import torch

from tformer.tasks.speech_metrics import error_counts, error_rates
from tformer.training.config import load_config

from speech_helpers import TINY_SPEC, requires_espeak


def test_error_rates_on_hand_checked_strings():
    # "the cat sat" -> "the bat sat": 1 of 11 characters, 1 of 3 words.
    assert error_rates(["the cat sat"], ["the bat sat"]) == pytest.approx({"cer": 1 / 11, "wer": 1 / 3})
    # A deleted word: "a b c" -> "a c": 2 character edits ("b" and a space) of 5; 1 of 3 words.
    assert error_rates(["a b c"], ["a c"]) == pytest.approx({"cer": 2 / 5, "wer": 1 / 3})
    # Insertions count, so rates can exceed 1; an empty hypothesis deletes everything.
    assert error_rates(["hi"], ["hi there"]) == pytest.approx({"cer": 6 / 2, "wer": 1.0})
    assert error_rates(["one two"], [""]) == pytest.approx({"cer": 1.0, "wer": 1.0})
    # Pooled over utterances: total edits / total reference length.
    counts = error_counts(["abc", "de"], ["abc", "xe"])
    assert counts == {"char_errors": 1, "chars": 5, "word_errors": 1, "words": 2}
    with pytest.raises(ValueError, match="references"):
        error_rates(["a"], [])


def tiny_asr_config(tmp_path, corpus_dir, **run):
    return {
        "task": "asr",
        "model": {"d_model": 32, "n_heads": 2, "n_encoder_layers": 1, "n_layers": 1, "n_mels": 16, "conv_channels": 4,
                  "max_source_len": 64, "backend": "reference", "ctc": True},
        "data": {"corpus_dir": str(corpus_dir), "max_text_len": 20, "ctc_weight": 0.3, "eval_utterances": 2,
                 "eval_beams": 2},
        "optimizer": {"lr": 3e-3, "min_lr": 1e-3, "warmup_steps": 2},
        "training": {"micro_batch_size": 3, "precision": "fp32", "strategy": "single", "threads": 1,
                     "label_smoothing": 0.1},
        "run": {"steps": 2, "eval_interval": 0, "log_interval": 1, "out_dir": str(tmp_path / "run"), "export": True,
                **run},
        "sample": {"num_samples": 1},
        "logging": {"progress_bar": False, "wandb": False},
    }


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from tformer.data.speech_corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("speech") / "corpus", TINY_SPEC, progress=False)


@requires_espeak
def test_training_steps_lower_the_loss_on_a_few_utterances(tmp_path, tiny_corpus):
    from tformer.tasks.asr import AsrTask

    config = load_config(tiny_asr_config(tmp_path, tiny_corpus))
    task = AsrTask(config)
    task.load_data()
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate(*task.splits["train"])  # all six utterances
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, count = task.loss_sum(model, batch, label_smoothing=0.0)
        optimizer.zero_grad()
        (loss / count).backward()
        optimizer.step()
        losses.append(loss.item() / count)
    assert losses[-1] < losses[0] - 1.0  # nats per target character (with the CTC term)


@requires_espeak
@pytest.mark.slow
def test_train_evaluate_export_and_transcribe(tmp_path, tiny_corpus, capsys):
    from tformer.data.speech import read_manifest
    from tformer.cli.transcribe import main as transcribe
    from tformer.training.trainer import Trainer

    history = Trainer(load_config(tiny_asr_config(tmp_path, tiny_corpus))).fit()
    final = history[-1]
    for key in ("val/loss", "val/cer", "val/wer", "test/cer", "test/wer"):
        assert key in final and final[key] >= 0.0
    wav = tiny_corpus / read_manifest(tiny_corpus, "test")[0]["path"]
    capsys.readouterr()
    transcripts = transcribe(["--checkpoint", str(tmp_path / "run"), "--beams", "2", str(wav)])
    assert capsys.readouterr().out == transcripts[0] + "\n"
    assert set(transcripts[0]) <= set(" 'abcdefghijklmnopqrstuvwxyz")


def test_transcribe_user_errors_exit_2(tmp_path, capsys):
    from tformer.cli.transcribe import main as transcribe

    for argv in (["--checkpoint", str(tmp_path), str(tmp_path / "missing.wav")],
                 ["--checkpoint", str(tmp_path), "--beams", "0", __file__]):
        with pytest.raises(SystemExit) as exit_info:
            transcribe(argv)
        assert exit_info.value.code == 2
        assert "error:" in capsys.readouterr().err
