"""Every task on two CPU ranks (gloo) under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3: no hang, no
crash, and the same evaluation as one process.

Each task's evaluation splits are sized so that their batches do not divide evenly over the two
ranks: one rank runs a filler batch (and, for ASR, keeps decoding finished rows until the
other rank is done), which is where a sharded model used to hang. The two-rank run trains,
checkpoints, exports and evaluates (ASR decoding included); one process then evaluates the
exported weights on the same data, and the metrics must agree.

All six tasks run one after another inside one launch per strategy (tests/two_rank_driver.py),
so the three launches together cost a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from tformer.training.config import load_config
from tformer.training.trainer import Trainer

from imdb_synthetic import make_imdb_archive
from train_helpers import free_port, tiny_config

REPO = Path(__file__).resolve().parents[1]
TASKS = ("lm", "classify", "classify_hf", "mlm", "multitask", "asr")
STRATEGIES = {
    "fsdp2": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()],
              {"training": {"strategy": "fsdp2"}}),
    "zero2": ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port()],
              {"training": {"strategy": "deepspeed"}, "deepspeed": {"zero_optimization": {"stage": 2}}}),
    "zero3": ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port()],
              {"training": {"strategy": "deepspeed"}, "deepspeed": {"zero_optimization": {"stage": 3}}}),
}
COMMON = {"optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
          "logging": {"progress_bar": False, "wandb": False, "layer_grad_norms": False}}
RUN = {"steps": 2, "eval_interval": 1, "log_interval": 1, "checkpoint_interval": 0, "export": True}
ENCODER = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "backend": "reference"}
IMDB_DATA = {"expected_per_class": None, "bpe_vocab_size": 300, "max_tokens": 24, "head_tokens": 8, "val_size": 10,
             "eval_batch_size": 4}


# ----------------------------------------------------------------------------- data

def write_noise_corpus(folder: Path, counts: dict[str, int]) -> Path:
    """A speech corpus in :mod:`tformer.data.speech_corpus`'s layout (manifest and WAVs), of
    noise and short transcripts: enough to train a step and decode, without espeak-ng."""
    soundfile = pytest.importorskip("soundfile")

    from tformer.data.speech_corpus import CorpusSpec

    rng = np.random.default_rng(0)
    rows = []
    for split, count in counts.items():
        (folder / "wav" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            path = Path("wav") / split / f"{index:03d}.wav"
            audio = rng.uniform(-0.3, 0.3, 1600 + 400 * (index % 4)).astype("float32")
            soundfile.write(str(folder / path), audio, 16000, subtype="PCM_16")
            rows.append({"split": split, "path": str(path), "text": ["a cat", "to be", "hi there", "no"][index % 4]})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # The marker of a built corpus: the task's prepare_data finds it and builds nothing.
    (folder / "corpus.json").write_text(json.dumps({"spec": json.loads(json.dumps(asdict(CorpusSpec())))}))
    return folder


def write_tiny_bert(folder: Path) -> Path:
    """A one-layer, 32-wide BERT, saved as a Hugging Face folder. Its WordPiece vocabulary is
    written here (characters and their continuations), so the test needs neither a download nor
    the 'pretrained' extra: it checks the two-rank evaluation, not the tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.set_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_configs(tmp_path_factory) -> dict[str, dict]:
    """One tiny config per task (single process; the strategy is layered on per test)."""
    tmp = tmp_path_factory.mktemp("two_rank_data")
    archive = make_imdb_archive(tmp / "aclImdb_v1.tar.gz", per_class=20, unsup=10)
    imdb = {**IMDB_DATA, "path": str(archive), "cache_dir": str(tmp / "cache")}
    # micro-batch 2 on each rank; evaluation batches of 4 (2 x micro) unless set.
    training = {"micro_batch_size": 2, "precision": "fp32", "strategy": "single", "threads": 1}
    lm = tiny_config(tmp / "lm", training=training, run={**RUN, "eval_batches": 3, "final_eval_batches": None},
                     sample={"num_samples": 1, "max_new_tokens": 4})
    configs = {
        "lm": {**lm, **COMMON},
        "classify": {"task": "classify", "model": {**ENCODER, "pooling": "mean"},
                     "data": {**imdb, "test_limit": 10}, "training": training,
                     "run": {**RUN, "eval_batches": 1, "final_eval_batches": None}},
        "classify_hf": {"task": "classify_hf",
                        "model": {"pretrained": str(write_tiny_bert(tmp / "tiny_bert")), "dropout": 0.0,
                                  "backend": "reference"},
                        "data": {**imdb, "test_limit": 6}, "training": training,
                        "run": {**RUN, "eval_batches": 1, "final_eval_batches": None}},
        "mlm": {"task": "mlm", "model": {**ENCODER, "pooling": "mean"},
                "data": {**imdb, "test_at_end": False, "eval_batch_size": 7}, "training": training,
                "run": {**RUN, "eval_batches": 1, "final_eval_batches": None}},
        "multitask": {"task": "multitask",
                      "model": {**ENCODER, "heads": {"sentiment": {"kind": "classification"},
                                                     "rating": {"kind": "regression", "bounds": [1.0, 10.0]}}},
                      "data": {**imdb, "test_at_end": False},
                      "training": training, "run": {**RUN, "eval_batches": 1, "final_eval_batches": None}},
        "asr": {"task": "asr",
                "model": {"d_model": 32, "n_heads": 2, "n_encoder_layers": 1, "n_layers": 1, "n_mels": 16,
                          "conv_channels": 4, "max_source_len": 64, "backend": "reference", "ctc": True,
                          "spec_augment": False},  # random masks differ per rank; training is compared too
                # 9 utterances in batches of 2: 5 batches, 3 on rank 0 and 2 + a filler on rank 1.
                "data": {"corpus_dir": str(write_noise_corpus(tmp / "speech", {"train": 8, "val": 9, "test": 9})),
                         "max_text_len": 12, "ctc_weight": 0.3, "eval_utterances": 9, "eval_beams": 2},
                "training": training, "run": {**RUN, "eval_interval": 0}, "sample": {"num_samples": 1}},
    }
    for name, config in configs.items():
        config.update({k: v for k, v in COMMON.items() if k not in config})
        config["run"]["out_dir"] = str(tmp / "single" / name)
    return configs


# ----------------------------------------------------------------------------- checks

def final_eval(run_dir: Path) -> dict[str, float]:
    """The metrics of the last evaluation logged in ``run_dir/metrics.jsonl`` (split metrics only)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val/loss" in r][-1]
    return {k: v for k, v in last.items() if k.split("/")[0] in ("val", "test")}


def single_process_eval(config: dict, export: Path, out_dir: Path) -> tuple[dict[str, float], Trainer]:
    """One process evaluates the weights ``export`` holds on the same data (final evaluation)."""
    from tformer.models.pretrained import load_pretrained

    config = {**config, "run": {**config["run"], "out_dir": str(out_dir)}}
    trainer = Trainer(load_config(config))
    exported, _ = load_pretrained(export)
    trainer.model.load_state_dict(exported.state_dict())
    metrics, _ = trainer.evaluate(final=True)
    trainer.release_lock()
    return metrics, trainer


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def single_process_train_losses(config: dict, out_dir: Path) -> list[float]:
    """One process, two micro-batches per step: the batches the two ranks draw at each step."""
    config = json.loads(json.dumps(config))
    config["training"]["grad_accum_steps"] = 2
    config["run"].update(out_dir=str(out_dir), eval_interval=0, export=False)
    return [record["train/loss"] for record in Trainer(load_config(config)).fit()]


# Tasks whose ranks draw, at each step, the micro-batches one process draws over two accumulation
# steps (and no dropout): their training losses must match too, gradients through the sharding included.
SAME_TRAINING = ("classify", "asr")


def eval_batch_counts(trainer: Trainer) -> list[int]:
    """How many batches each evaluated split (and multitask head) has in one process."""
    task = trainer.task
    if task.name == "asr":
        return [len(list(task._batches(split))) for split in task.eval_splits(True)]
    if task.name == "multitask":
        return [len(list(task.eval_batches(split, True, head))) for split in task.eval_splits(True)
                for head in task.tasks]
    return [len(list(task.eval_batches(split, True))) for split in task.eval_splits(True)]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_task_on_two_ranks_evaluates_like_one_process(task_configs, tmp_path, strategy):
    launcher, settings = STRATEGIES[strategy]
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    plan = []
    for name in TASKS:
        config = json.loads(json.dumps(task_configs[name]))
        for section, values in settings.items():
            config[section] = {**config.get(section, {}), **values}
        config["run"]["out_dir"] = str(tmp_path / name)
        plan.append(config)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # tests/two_rank_driver.py puts the repository last on the path
    command = [*launcher, str(REPO / "tests" / "two_rank_driver.py"), str(tmp_path / "plan.json")]
    # A hang is the failure this test exists for: the time limit turns it into a failure.
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "params=0.00M" not in result.stdout  # ZeRO-3's placeholders are counted whole
    for name in TASKS:
        assert f"finished {name}" in result.stdout, name
        two_ranks = final_eval(tmp_path / name)
        one, trainer = single_process_eval(task_configs[name], tmp_path / name / "export", tmp_path / f"one_{name}")
        # The premise: some split has an odd number of batches, so one of the two ranks runs filler.
        assert any(count % 2 for count in eval_batch_counts(trainer)), (name, eval_batch_counts(trainer))
        assert set(two_ranks) == set(one), name
        for key, value in one.items():
            assert two_ranks[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key, two_ranks[key], value)
        if name in SAME_TRAINING:
            want = single_process_train_losses(task_configs[name], tmp_path / f"train_{name}")
            assert train_losses(tmp_path / name) == pytest.approx(want, rel=1e-4), name
    if strategy == "fsdp2":
        # Started again into the LM's folder without --resume: every rank stops at once with
        # rank 0's one line, none waits for the others.
        (tmp_path / "again.json").write_text(json.dumps(plan[0]))
        again = subprocess.run([*launcher, str(REPO / "tformer" / "train.py"), "--config", str(tmp_path / "again.json")],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode != 0 and f"error: run.out_dir {tmp_path / 'lm'} holds another run" in again.stderr


# ----------------------------------------------------------------------------- the rules, in one process

@pytest.mark.parametrize("num_batches, world_size", [(0, 2), (1, 2), (5, 2), (7, 3), (6, 3)])
def test_deal_batches_gives_every_rank_as_many_and_every_batch_once(num_batches, world_size):
    from tformer.data.dealing import deal_batches

    batches = [[index] for index in range(num_batches)]
    dealt = [deal_batches(batches, world_size=world_size, rank=rank) for rank in range(world_size)]
    assert len({len(share) for share in dealt}) == 1
    assert sorted(b[0] for share in dealt for b in share if b is not None) == list(range(num_batches))
    with pytest.raises(ValueError, match="rank=2 must be in"):
        deal_batches(batches, world_size=2, rank=2)


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_keeps_stepping_until_every_rank_is_done(beams):
    """A rank whose rows finished keeps running decoder steps (each would gather sharded
    weights) until ``all_done`` says every rank is done; its own output does not change."""
    import torch

    from tformer.generation.seq2seq import beam_search, decode
    from tformer.models import EncoderDecoderConfig, EncoderDecoderTransformer

    torch.manual_seed(0)
    model = EncoderDecoderTransformer(EncoderDecoderConfig(
        vocab_size=8, max_seq_len=12, d_model=16, n_heads=2, n_layers=1, n_encoder_layers=1, encoder_input="tokens",
        src_vocab_size=8, backend="reference"))
    with torch.no_grad():  # EOS (id 2) always wins: every row finishes at the first step
        model.lm_head.weight.zero_()
        model.lm_head.weight[2] = 1.0
        model.decoder_norm.weight.zero_()
        model.decoder_norm.bias.fill_(1.0)
    source, lengths = torch.randint(3, 8, (2, 5)), torch.tensor([5, 3])
    steps = []
    model.decode = (lambda original: lambda *a, **k: steps.append(1) or original(*a, **k))(model.decode)
    run = (lambda **k: decode(model, source, lengths, bos_id=1, eos_id=2, max_len=9, **k)) if beams == 1 else \
        (lambda **k: beam_search(model, source, lengths, bos_id=1, eos_id=2, max_len=9, num_beams=beams, **k))
    alone = run()
    own_steps = len(steps)
    assert own_steps <= 2 and alone == [[], []]
    steps.clear()
    # The other rank finishes 3 steps later than this one.
    assert run(all_done=lambda local_done: local_done and len(steps) >= own_steps + 3) == alone
    assert len(steps) == own_steps + 3
