"""Fault injection: runs killed with SIGKILL at random moments resume to the same losses as an
uninterrupted run, bitwise (fp32); damaged checkpoints (truncated, a flipped byte, a missing
file) are detected and skipped for the newest one that verifies; a full disk while saving leaves
the previous checkpoint intact; one run per out_dir (a stale lock is taken over); bad data files
are clear errors naming the file."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tformer.cli.errors import UsageError, run_cli
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_verify
from tformer.training.config import ConfigError, load_config
from tformer.training.run_lock import LOCK_NAME, RunLock, RunLocked
from tformer.training.trainer import Trainer

from train_helpers import free_port, tiny_config

REPO = Path(__file__).resolve().parents[1]
DROPOUT = dict(model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1, "backend": "reference"},
               optimizer={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 40})


def _train_subprocess(config_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "tformer" / "train.py"), "--config", str(config_path), *extra],
                            cwd=config_path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats steps: {steps}"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


# ----------------------------------------------------------------------------- kill -9 and resume

def _last_logged_step(run_dir: Path) -> int:
    """The highest step in metrics.jsonl so far (a line being written is skipped)."""
    last = 0
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        try:
            last = max(last, json.loads(line).get("step", 0))
        except ValueError:
            pass
    return last


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
    steps = 40
    # Evaluations every 5 steps fall between checkpoints, so some are inside a killed interval.
    config = tiny_config(tmp_path, run={"steps": steps, "checkpoint_interval": 2, "keep_checkpoints": 2,
                                        "eval_interval": 5}, **DROPOUT)
    reference = [h["train/loss"] for h in Trainer(load_config(
        {**config, "run": {**config["run"], "out_dir": str(tmp_path / "reference")}})).fit()]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    run_dir = Path(config["run"]["out_dir"])
    rng = random.Random(24)
    kills = 0
    while kills < 3:
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        start_step = int(latest.name.split("_")[1]) if latest else 0
        process = _train_subprocess(path, *(("--resume",) if latest else ()))
        # Kill at a random moment a few steps into this attempt (possibly mid-save: every 2nd
        # step saves), counted from the log so the test holds on fast and slow machines alike.
        # (metrics.jsonl may still hold the killed attempt's later steps until the resume truncates it)
        target = max(start_step, _last_logged_step(run_dir)) + rng.randint(1, 5)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and _last_logged_step(run_dir) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is not None:
            break  # finished (or failed) before the kill
        process.kill()
        process.wait()
        kills += 1
    final = _train_subprocess(path, "--resume")
    out, err = final.communicate(timeout=240)
    assert final.returncode == 0, err[-3000:]
    assert kills == 3, "the run finished before it could be killed three times; make it longer"
    losses = _logged_losses(run_dir)
    assert [losses[step] for step in range(1, steps + 1)] == reference
    assert _logged_evaluations(run_dir) == _logged_evaluations(tmp_path / "reference")


# Two ranks of each multi-rank layout: the launcher, its port, and the strategy's settings.
TWO_RANK_RUNS = {
    "fsdp2": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()],
              {"training": {"strategy": "fsdp2", "micro_batch_size": 2, "grad_accum_steps": 2}}),
    "deepspeed_zero2": ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port()],
                        {"training": {"strategy": "deepspeed", "precision": "fp32", "micro_batch_size": 2,
                                      "grad_accum_steps": 2},
                         "deepspeed": {"zero_optimization": {"stage": 2}}}),
    "deepspeed_zero3": ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port()],
                        {"training": {"strategy": "deepspeed", "precision": "fp32", "micro_batch_size": 2,
                                      "grad_accum_steps": 2},
                         "deepspeed": {"zero_optimization": {"stage": 3}}}),
}


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", sorted(TWO_RANK_RUNS))
def test_two_ranks_sigkill_then_resume_is_bitwise_exact(tmp_path, layout):
    """Both ranks killed at once (the whole process group, as a node failure) mid-run; the
    resumed run's losses and evaluations equal an uninterrupted two-rank run's bitwise (fp32,
    gloo), for the FSDP2/DCP and the DeepSpeed ZeRO-2 and ZeRO-3 checkpoint layouts. An
    evaluation (every 3 steps, between the checkpoints every 2) falls inside the killed interval."""
    if layout.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    launcher, settings = TWO_RANK_RUNS[layout]
    steps = 12
    config = tiny_config(tmp_path, run={"steps": steps, "checkpoint_interval": 2, "eval_interval": 3}, **settings,
                         **DROPOUT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(name: str, *extra: str) -> subprocess.Popen:
        config["run"]["out_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        command = [*launcher, str(REPO / "tformer" / "train.py"), "--config", str(path), *extra]
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    reference = launch("reference")
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    killed = launch("killed")
    deadline = time.time() + 180
    # Killed just after the step-3 evaluation, before or while step 4 is checkpointed: the resume
    # from step 2 (or 4) repeats what the evaluation may have disturbed.
    while time.time() < deadline and killed.poll() is None and 3 not in _logged_evaluations(tmp_path / "killed"):
        time.sleep(0.005)
    time.sleep(random.Random(2).uniform(0.0, 0.02))
    assert killed.poll() is None, "the run finished before the kill"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = launch("killed", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    want = _logged_losses(tmp_path / "reference")
    assert _logged_losses(tmp_path / "killed") == want and len(want) == steps
    assert _logged_evaluations(tmp_path / "killed") == _logged_evaluations(tmp_path / "reference")
    assert sorted(_logged_evaluations(tmp_path / "reference")) == [3, 6, 9, 12]


def _logged_evaluations(run_dir: Path) -> dict[int, float]:
    """``{step: val/loss}`` of the evaluations in metrics.jsonl so far (a line being written is skipped)."""
    records = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    steps = [r["step"] for r in records if "val/loss" in r]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats evaluations: {steps}"
    return {r["step"]: r["val/loss"] for r in records if "val/loss" in r}


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run with complete checkpoints at steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("finished")
    config = tiny_config(tmp, run={"steps": 6, "checkpoint_interval": 2, "keep_checkpoints": 3, "export": True})
    Trainer(load_config(config)).fit()
    return tmp, config


def _copy_run(finished_run, tmp_path):
    source, config = finished_run
    shutil.copytree(source / "run", tmp_path / "run")
    config = json.loads(json.dumps(config))
    config["run"]["out_dir"] = str(tmp_path / "run")
    config["run"]["steps"] = 8
    return config, tmp_path / "run" / "checkpoints"


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": ("dcp", _truncate), "flipped_byte": ("trainer_rank0.pt", _flip_byte),
          "missing_file": ("export/model.safetensors", lambda p: p.unlink())}


def _damage(newest: Path, kind: str) -> Path:
    relative, action = DAMAGE[kind]
    target = newest / relative
    if target.is_dir():  # the largest shard of the DCP folder
        target = max((p for p in target.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    action(target)
    return target


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_a_warning(finished_run, tmp_path, kind):
    config, checkpoints = _copy_run(finished_run, tmp_path)
    newest = checkpoints / ckpt.step_dir_name(6)
    damaged = _damage(newest, kind)
    with pytest.warns(UserWarning, match=rf"skipping damaged checkpoint .*step_0000006.*{damaged.name}"):
        trainer = Trainer(load_config(config), resume=True)
    assert trainer.step == 4 and trainer.resumed_from.name == ckpt.step_dir_name(4)
    with pytest.raises(checkpoint_verify.CheckpointDamaged, match=rf"--resume=strict: .*{damaged.name}"):
        Trainer(load_config(config), resume="strict")
    with pytest.raises(checkpoint_verify.CheckpointDamaged, match=damaged.name):
        Trainer(load_config(config), resume=str(newest))  # named explicitly: no fallback


def test_verify_command_reports_damage(finished_run, tmp_path, capsys):
    from tformer.cli.checkpoint import main

    config, checkpoints = _copy_run(finished_run, tmp_path)
    assert run_cli(main, ["verify", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.count(": ok") == 4  # three checkpoints and the export
    _damage(checkpoints / ckpt.step_dir_name(4), "flipped_byte")
    _flip_byte(tmp_path / "run" / "export" / "model.safetensors")
    assert run_cli(main, ["verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "step_0000004: DAMAGED" in out and "trainer_rank0.pt" in out and "export: DAMAGED" in out
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["verify", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: verify:")


def test_altered_export_is_refused_on_load(finished_run, tmp_path):
    from tformer.models.pretrained import load_pretrained

    _copy_run(finished_run, tmp_path)
    export = tmp_path / "run" / "export"
    load_pretrained(export)
    _flip_byte(export / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors does not match the SHA-256"):
        load_pretrained(export)


def test_altered_export_is_refused_by_init_from(finished_run, tmp_path):
    from tformer.models.pretrained import load_pretrained
    from tformer.training.init_from import load_trunk

    _copy_run(finished_run, tmp_path)
    export = tmp_path / "run" / "export"
    model, _ = load_pretrained(export)
    _flip_byte(export / "model.safetensors")
    with pytest.raises(ValueError, match=r"init_from: .*export is damaged: .*model.safetensors"):
        load_trunk(model, export)


def test_every_checkpoint_damaged_is_a_clear_error(finished_run, tmp_path):
    config, checkpoints = _copy_run(finished_run, tmp_path)
    for folder in checkpoints.iterdir():
        _damage(folder, "flipped_byte")
    with pytest.warns(UserWarning), pytest.raises(checkpoint_verify.CheckpointDamaged, match="every checkpoint"):
        Trainer(load_config(config), resume=True)


# ----------------------------------------------------------------------------- a full disk

def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    config = load_config(tiny_config(tmp_path, run={"steps": 4, "checkpoint_interval": 2}))
    trainer = Trainer(config)
    saves = {"count": 0}
    original = ckpt.save_trainer_state

    def disk_fills_up(folder, rank, state):
        saves["count"] += 1
        if saves["count"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(folder, rank, state)

    monkeypatch.setattr(ckpt, "save_trainer_state", disk_fills_up)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: trainer.fit(), [])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: checkpoint: writing step 4") and "No space left on device" in message
    assert "step_0000002 is intact" in message and "\n" not in message
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [ckpt.step_dir_name(2)]  # no half-written folder
    assert checkpoint_verify.verify_checkpoint(checkpoints / ckpt.step_dir_name(2)) == []


# ----------------------------------------------------------------------------- one run per out_dir

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_second_run_on_the_same_out_dir_refuses(tmp_path):
    config = tiny_config(tmp_path, run={"steps": 4})
    first = Trainer(load_config(config))  # this process runs (holds the lock) while a second one starts
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    second = _train_subprocess(path)
    out, err = second.communicate(timeout=120)
    lock = Path(config["run"]["out_dir"]) / LOCK_NAME
    assert second.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"error: run.out_dir {lock.parent} is in use by another run "
                                                   f"(pid {os.getpid()}")
    assert "Traceback" not in err and not (lock.parent / "checkpoints").exists()
    first.fit()  # the first run is undisturbed
    assert not lock.exists()


def test_lock_of_a_live_run_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    config = load_config(tiny_config(tmp_path, run={"steps": 2}))
    out_dir = Path(config.run.out_dir)
    out_dir.mkdir(parents=True)
    lock = out_dir / LOCK_NAME
    holder = ("import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h1'}).encode()); "
              "print('locked', flush=True); time.sleep(60)")
    alive = subprocess.Popen([sys.executable, "-c", holder, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"in use by another run \(pid {alive.pid} on h1"):
            Trainer(config)
    finally:
        alive.kill()  # like kill -9: the file stays, naming a run that is gone
        alive.wait()
    assert json.loads(lock.read_text())["pid"] == alive.pid
    with pytest.warns(UserWarning, match=rf"taking over the stale lock .*pid {alive.pid} on h1"):
        trainer = Trainer(config)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not lock.exists()  # released at the end
    lock.write_text('{"pid": 12')  # a lock cut short by a kill while it was written
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        RunLock(out_dir).acquire().release()


# ----------------------------------------------------------------------------- bad data files

@pytest.mark.parametrize("content, message", [
    (b"", r"is empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50, r"looks binary"),
    ("caf\u00e9 cr\u00e8me ".encode("latin-1") * 100, r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    (b"Too short.\n", r"has \d+ (characters|tokens)"),
])
def test_bad_text_file_is_a_clear_error_naming_it(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    config = load_config(tiny_config(tmp_path, data={"path": str(path)}))
    with pytest.raises(ValueError, match=rf"(?s){path}.*{message}|{message}.*{path}") as error:
        Trainer(config)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("kind", ["empty_archive", "binary_archive", "empty_review", "latin1_review", "binary_review"])
def test_bad_imdb_input_is_a_clear_error_naming_it(tmp_path, kind):
    from imdb_synthetic import make_imdb_archive
    from tformer.data.imdb import ImdbDataError, load_imdb

    if kind.endswith("archive"):
        path = tmp_path / "aclImdb_v1.tar.gz"
        path.write_bytes(b"" if kind == "empty_archive" else os.urandom(4096))
        expected = str(path)
    else:
        root = make_imdb_archive(tmp_path / "imdb", 2, directory=True)
        review = next((tmp_path / "imdb").rglob("train/pos/*.txt"))
        review.write_bytes({"empty_review": b"", "latin1_review": "tr\u00e8s bien".encode("latin-1"),
                            "binary_review": b"\x00\x01\x02 great"}[kind])
        path, expected = root, review.name
    with pytest.raises(ImdbDataError, match=expected.replace(".", r"\.")):
        load_imdb(path, expected_per_class=None)


# ----------------------------------------------------------------------------- a second run into the same out_dir

def test_a_second_run_into_a_used_out_dir_is_refused_until_resume_or_overwrite(finished_run, tmp_path, capsys):
    """Without --resume, a run into a folder holding another run's checkpoints, metrics and
    export stops before writing anything, with one line naming the folder and both ways out;
    --overwrite starts afresh; nothing of the first run is truncated or pruned meanwhile."""
    from tformer.cli.train import main

    config, checkpoints = _copy_run(finished_run, tmp_path)
    run_dir = tmp_path / "run"
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--config", str(path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith(f"error: run.out_dir {run_dir} holds another run")
    assert "checkpoints/" in message and "metrics.jsonl" in message and "export/" in message
    assert "--resume" in message and "new run.out_dir" in message and "--overwrite" in message
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert not (run_dir / ".lock").exists() and not any(p.name == LOCK_NAME for p in run_dir.iterdir())

    config["run"]["steps"] = 2
    path.write_text(json.dumps(config))
    run_cli(main, ["--config", str(path), "--overwrite"])
    assert sorted(p.name for p in checkpoints.iterdir()) == [ckpt.step_dir_name(2)]
    assert max(_logged_losses(run_dir)) == 2


def test_pruning_never_removes_the_checkpoint_just_written(finished_run, tmp_path):
    """Resumed from step 2 of a run that went on to 6, with keep_checkpoints=1: the run's own
    step 3 stays (it used to rank below 4 and 6 and be deleted at once); 4 and 6 are untouched."""
    config, checkpoints = _copy_run(finished_run, tmp_path)
    config["run"].update(steps=3, keep_checkpoints=1)
    Trainer(load_config(config), resume=str(checkpoints / ckpt.step_dir_name(2))).fit()
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == [ckpt.step_dir_name(step) for step in (3, 4, 6)]
    assert checkpoint_verify.choose_resume_checkpoint(checkpoints, strict=True) == checkpoints / ckpt.step_dir_name(6)


def test_an_out_dir_that_is_a_file_is_named(tmp_path):
    config = load_config(tiny_config(tmp_path))
    Path(config.run.out_dir).write_text("not a folder")
    with pytest.raises(UsageError, match=rf"run.out_dir {tmp_path / 'run'} is a file, not a folder"):
        Trainer(config)
