"""Visualizations: attention weights equal the reference op's, gradient-flow warnings, every
plot command writes a valid, non-blank PNG of the expected size, ``--visualize`` in training."""

import json
import logging
import math
import random
import shutil

import numpy as np
import pytest
import torch

from tformer import ops
from tformer.models import DecoderLM, EncoderClassifier, EncoderClassifierConfig, ModelConfig
from tformer.nn import Attention
from tformer.cli import train as train_cli
from tformer.training.config import LoggingConfig
from tformer.training.strategies import layer_groups
from tformer.cli import visualize as cli
from tformer.visualization.attention import attention_maps
from tformer.visualization.gradient_health import gradient_warnings
from tformer.visualization.plotting import DPI

from train_helpers import tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, size=None):
    """A PNG file of ``size`` = (width, height) pixels that is not one flat colour."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    if size is not None:
        assert (pixels.shape[1], pixels.shape[0]) == size
    rgb = (pixels[..., :3] * 255).astype(np.uint32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert pixels[..., :3].std() > 0.01, f"{path} is blank"
    assert len(colours) > 20, f"{path} holds almost nothing ({len(colours)} colours)"


# ----------------------------------------------------------------------------- attention weights

def _captured_qkv(model, tokens, **kwargs):
    """q, k, v of every self-attention Attention as its op receives them (captured independently of the
    visualization's hook, by the module's forward output)."""
    captured = []

    def hook(module, args, kwargs_):
        captured.append(module.project_qkv(args[0], positional=kwargs_.get("positional"),
                                           position_offset=kwargs_.get("position_offset", 0)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, Attention) and not m.cross]
    with torch.no_grad():
        model(tokens, **kwargs)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_decoder_attention_weights_are_the_reference_ops_probabilities(positional):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=13, max_seq_len=12, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                                  positional=positional, backend="reference")).eval()
    tokens = torch.randint(0, 13, (2, 9))
    maps = attention_maps(model, tokens)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 9, 9)] * 2
    for probs, (q, k, v) in zip(maps, _captured_qkv(model, tokens)):
        # Plain PyTorch implementation, float64: softmax of causal scaled scores.
        keys = k.double().repeat_interleave(2, dim=1)
        scores = q.double() @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(probs.double(), scores.softmax(-1), rtol=1e-5, atol=1e-6)
        # Check results: the weights reproduce the reference op's output.
        out = ops.attention(q, k, v, causal=True, backend="reference")
        torch.testing.assert_close(probs @ v.repeat_interleave(2, dim=1), out, rtol=1e-5, atol=1e-6)


def test_encoder_attention_ignores_padding_keys():
    torch.manual_seed(0)
    model = EncoderClassifier(EncoderClassifierConfig(vocab_size=13, max_seq_len=8, d_model=16, n_layers=1,
                                                      n_heads=2, backend="reference")).eval()
    tokens = torch.randint(0, 13, (2, 6))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    (probs,) = attention_maps(model, tokens, key_padding_mask=padding)
    assert probs.shape == (2, 2, 7, 7)  # CLS first
    assert probs[1, :, :, 5:].abs().max() == 0 and probs[0, :, :, 5:].min() > 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 7))
    q, k, v = _captured_qkv(model, tokens, key_padding_mask=padding)[0]
    full_padding = torch.cat([torch.zeros(2, 1, dtype=torch.bool), padding], dim=1)
    out = ops.attention(q, k, v, key_padding_mask=full_padding, backend="reference")
    torch.testing.assert_close(probs @ v, out, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- gradient flow

def _layer_norms(model):
    return {f"grad_norm/{name}": math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in members))
            for name, members in layer_groups(model).items()}


def test_vanishing_and_exploding_gradients_are_flagged_on_a_constructed_model():
    """block_0 feeds a saturated tanh (its gradients vanish); block_2's weights are huge, so the
    gradient reaching block_1 explodes; block_2's own gradient stays moderate."""
    torch.manual_seed(0)

    class Constructed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            return self.blocks[2](self.blocks[1](torch.tanh(self.blocks[0](x))))

    model = Constructed()
    with torch.no_grad():
        model.blocks[0].weight.mul_(1e4)
        model.blocks[2].weight.mul_(1e6)
    model(torch.randn(16, 8)).mean().backward()
    norms = _layer_norms(model)
    defaults = LoggingConfig()
    warnings = gradient_warnings(norms, defaults.grad_vanish_below, defaults.grad_explode_above)
    assert len(warnings) == 2, (norms, warnings)
    assert warnings[0].startswith("vanishing gradients in block_0")
    assert warnings[1].startswith("exploding gradients in block_1")
    assert gradient_warnings({"grad_norm/block_0": float("nan")}, None, None) == \
        ["exploding gradients in block_0: norm nan"]
    assert gradient_warnings(norms, None, None) == []


# ----------------------------------------------------------------------------- training + plots

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny LM run through the training command with --visualize and thresholds that make
    every layer warn; returns (run folder, captured warnings)."""
    tmp_path = tmp_path_factory.mktemp("visualize")
    config = tiny_config(tmp_path, run={"steps": 4, "export": True, "log_interval": 2},
                         logging={"progress_bar": False, "wandb": False, "grad_vanish_below": 1e9})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("tformer").addHandler(handler)
    try:
        train_cli.main(["--config", str(path), "--visualize"])
    finally:
        logging.getLogger("tformer").removeHandler(handler)
    return tmp_path / "run", [r.getMessage() for r in records if r.levelno == logging.WARNING]


def test_training_warns_and_draws_with_visualize(trained_run):
    run, warnings = trained_run
    assert any(w.startswith("step 2: vanishing gradients in block_0") for w in warnings)
    assert any("block_1" in w for w in warnings)
    assert_png(run / "plots" / "training_curves.png", (1500, 800))
    assert_png(run / "plots" / "gradient_flow.png", (1200, 450))


def test_attention_command_draws_every_layer_and_head(trained_run, tmp_path, capsys):
    run, _ = trained_run
    out = tmp_path / "attention.png"
    assert cli.main(["attention", "--checkpoint", str(run), "--text", "First Citizen", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    layers, heads = 2, 2  # tiny_config
    assert_png(out, (int((2.5 * heads + 1.0) * DPI), int(2.5 * layers * DPI)))


def test_curves_and_gradients_commands(trained_run, tmp_path):
    run, _ = trained_run
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints", "export", "plots"))
    assert cli.main(["curves", str(run), str(other), "--out", str(tmp_path / "curves.png")]) == 0
    assert_png(tmp_path / "curves.png", (1500, 800))
    assert cli.main(["gradients", str(run), "--out", str(tmp_path / "grads.png")]) == 0
    assert_png(tmp_path / "grads.png", (1200, 450))


def test_embeddings_command_tsne_of_pooled_states(tmp_path):
    from imdb_synthetic import make_imdb_archive, synthetic_review
    from tformer.data.bpe import train_bpe
    from tformer.data.imdb import LABEL_NAMES
    from tformer.models.pretrained import save_pretrained

    archive = make_imdb_archive(tmp_path / "imdb.tar.gz", per_class=20)
    rng = random.Random(0)
    tokenizer = train_bpe([synthetic_review(rng, i % 2 == 0) for i in range(200)], 300)
    torch.manual_seed(0)
    model = EncoderClassifier(EncoderClassifierConfig(vocab_size=tokenizer.get_vocab_size(), max_seq_len=64,
                                                      d_model=16, n_layers=1, n_heads=2, pooling="mean"))
    save_pretrained(model, tmp_path / "export", task="classify",
                    metadata={"labels": list(LABEL_NAMES), "tokenizer": json.loads(tokenizer.to_str()),
                              "max_tokens": 64, "head_tokens": 16})
    out = tmp_path / "tsne.png"
    assert cli.main(["embeddings", "--checkpoint", str(tmp_path / "export"), "--data", str(archive),
                     "--per-class", "10", "--out", str(out)]) == 0
    assert_png(out, (700, 600))


@pytest.mark.parametrize("argv, message", [
    (["attention", "--checkpoint", "/nonexistent", "--text", "a"], "holds no config.json"),
    (["curves", "/nonexistent"], "must be a run folder holding metrics.jsonl"),
])
def test_cli_user_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
