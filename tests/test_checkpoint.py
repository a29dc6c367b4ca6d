"""Checkpoints: N steps + resume for N more equals 2N straight, bitwise on the CPU; an
interrupted save never looks complete; export loads in DecoderLM.from_pretrained."""

import json

import torch

from tformer.training import checkpoint as ckpt
from tformer.training.config import load_config
from tformer.models.pretrained import load_pretrained
from tformer.training.trainer import Trainer

from train_helpers import tiny_config


def _losses(history):
    return [h["train/loss"] for h in history]


def test_resume_is_bitwise_exact(tmp_path):
    # Dropout on: the RNG state must be restored too.
    # The schedule must not depend on run.steps (decay_steps fixed), as a real resume that extends a run.
    sections = dict(model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1, "backend": "reference"},
                    optimizer={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 8},
                    training={"precision": "fp32", "strategy": "single", "threads": 1, "micro_batch_size": 4,
                              "grad_accum_steps": 2})
    straight = Trainer(load_config(tiny_config(tmp_path / "a", run={"steps": 8}, **sections))).fit()
    first = tiny_config(tmp_path / "b", run={"steps": 4, "checkpoint_interval": 4}, **sections)
    Trainer(load_config(first)).fit()
    first["run"]["steps"] = 8
    resumed_trainer = Trainer(load_config(first), resume=True)
    assert resumed_trainer.step == 4
    resumed = resumed_trainer.fit()
    assert _losses(resumed) == _losses(straight)[4:]
    assert [h["train/grad_norm"] for h in resumed] == [h["train/grad_norm"] for h in straight][4:]


def test_interrupted_save_is_ignored(tmp_path):
    folder = tmp_path / "checkpoints"
    writer = ckpt.CheckpointWriter(folder, 5, rank=0, barrier=lambda: None)
    (writer.tmp / "half_written").write_text("x")
    assert ckpt.latest_checkpoint(folder) is None  # killed before commit
    done = ckpt.CheckpointWriter(folder, 3, rank=0, barrier=lambda: None).commit({"step": 3}, keep=2)
    assert ckpt.latest_checkpoint(folder) == done and json.loads((done / ckpt.COMPLETE).read_text())["step"] == 3
    fake = folder / ckpt.step_dir_name(9)
    fake.mkdir()  # a folder without the marker is not a checkpoint
    assert ckpt.latest_checkpoint(folder) == done
    for step in (4, 6, 7):
        ckpt.CheckpointWriter(folder, step, rank=0, barrier=lambda: None).commit({"step": step}, keep=2)
    assert sorted(p.name for p in folder.iterdir() if (p / ckpt.COMPLETE).exists()) == ["step_0000006", "step_0000007"]



def test_killed_removal_never_leaves_a_complete_looking_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    commit = lambda step: ckpt.CheckpointWriter(folder, step, rank=0, barrier=lambda: None).commit({"step": step}, keep=1)
    first = commit(1)
    (first / "shard").write_text("x")
    ckpt.CheckpointWriter(folder, 7, rank=0, barrier=lambda: None)  # a save killed before its commit

    def killed_rmtree(path, ignore_errors=False):
        raise KeyboardInterrupt  # the process dies before deleting anything but what went first

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    try:
        commit(2)  # pruning step 1 (keep=1) is killed
    except KeyboardInterrupt:
        pass
    assert (first / "shard").exists() and not (first / ckpt.COMPLETE).exists()
    assert ckpt.latest_checkpoint(folder) == folder / ckpt.step_dir_name(2)
    monkeypatch.undo()
    commit(3)  # the next save clears what killed saves left behind
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000003"]

def test_export_loads_with_from_pretrained(tmp_path):
    config = load_config(tiny_config(tmp_path, run={"steps": 2, "export": True}))
    trainer = Trainer(config)
    trainer.fit()
    model, metadata = load_pretrained(tmp_path / "run" / "export")
    assert metadata["vocab"]["kind"] == "char"
    tokens = torch.randint(0, model.config.vocab_size, (2, 8))
    trainer.model.eval()
    torch.testing.assert_close(model(tokens), trainer.model(tokens), rtol=0, atol=0)
    from tformer.models import DecoderLM

    if hasattr(DecoderLM, "from_pretrained"):
        again = DecoderLM.from_pretrained(tmp_path / "run" / "export")
        torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)
    # Checkpoints carry an export too, which tformer sample reads.
    assert (ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "export" / "model.safetensors").is_file()


# --- a DCP checkpoint from before the encoder-decoder's layers became TransformerBlocks ---------
def _asr_model_and_optimizer(seed):
    from tformer.models import EncoderDecoderConfig, EncoderDecoderTransformer

    torch.manual_seed(seed)
    model = EncoderDecoderTransformer(EncoderDecoderConfig(
        encoder_input="tokens", vocab_size=11, src_vocab_size=13, d_model=16, n_heads=2, n_layers=1,
        n_encoder_layers=1, max_seq_len=12, max_source_len=12, backend="reference"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_one_step(model, optimizer):
    generator = torch.Generator().manual_seed(0)
    source, targets = torch.randint(3, 13, (2, 5), generator=generator), torch.randint(3, 11, (2, 4), generator=generator)
    model(source, torch.tensor([5, 3]), targets).float().square().mean().backward()
    optimizer.step()


def _former_name(key: str) -> str:
    """How the encoder-decoder layers named their self-attention before the one block."""
    for new, old in ((".attention.", ".self_attention."), (".attention_norm.", ".self_attention_norm.")):
        if "_blocks." in key and new in key:
            key = key.replace(new, old, 1)
    return key


def _save_with_former_names(folder, model, optimizer):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    model_state = {_former_name(k): v for k, v in model_state.items()}
    optimizer_state = {"state": {_former_name(k): v for k, v in optimizer_state["state"].items()},
                       "param_groups": [{**g, "params": [_former_name(p) for p in g["params"]]}
                                        for g in optimizer_state["param_groups"]]}
    assert any(".self_attention." in key for key in model_state)
    with ckpt._single_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "dcp"))


def _assert_resumed(model, optimizer, saved_model, saved_optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full = StateDictOptions(full_state_dict=True)
    got_model, got_optimizer = get_state_dict(model, optimizer, options=full)
    want_model, want_optimizer = get_state_dict(saved_model, saved_optimizer, options=full)
    assert got_model.keys() == want_model.keys()
    for key in want_model:
        torch.testing.assert_close(got_model[key], want_model[key], rtol=0, atol=0, msg=key)
    assert got_optimizer["state"].keys() == want_optimizer["state"].keys()
    for key, values in want_optimizer["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(got_optimizer["state"][key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    assert [g["params"] for g in got_optimizer["param_groups"]] == [g["params"] for g in want_optimizer["param_groups"]]


def test_dcp_checkpoint_with_former_block_names_resumes(tmp_path):
    saved_model, saved_optimizer = _asr_model_and_optimizer(seed=0)
    _train_one_step(saved_model, saved_optimizer)
    _save_with_former_names(tmp_path, saved_model, saved_optimizer)
    model, optimizer = _asr_model_and_optimizer(seed=1)
    ckpt.load_model_and_optimizer(tmp_path, model, optimizer)
    _assert_resumed(model, optimizer, saved_model, saved_optimizer)


def test_fsdp2_resumes_a_dcp_checkpoint_with_former_block_names(tmp_path):
    """An ASR run under FSDP2 (here one gloo rank) resumes from a checkpoint whose encoder-decoder
    layers still had their former names."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tformer.training.parallelize import apply_fsdp2

    saved_model, saved_optimizer = _asr_model_and_optimizer(seed=0)
    _train_one_step(saved_model, saved_optimizer)
    _save_with_former_names(tmp_path, saved_model, saved_optimizer)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, _ = _asr_model_and_optimizer(seed=1)
        apply_fsdp2(model, mesh=init_device_mesh("cpu", (1,)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ckpt.load_model_and_optimizer(tmp_path, model, optimizer)
        _assert_resumed(model, optimizer, saved_model, saved_optimizer)
    finally:
        dist.destroy_process_group()
