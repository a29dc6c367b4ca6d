"""Sampling: shapes, determinism with a seed, KV-cache decoding equals full recomputation,
top-k / top-p filtering, beam search, the command line."""

import pytest
import torch

from tformer.models.pretrained import save_pretrained
from tformer.models import DecoderLM, ModelConfig
from tformer.cli.sample import main
from tformer.generation.sampling import beam_search, filter_logits, generate


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=20, max_seq_len=32, d_model=32, n_layers=2, n_heads=2,
                                 backend="reference")).eval()


def test_shapes_and_seeded_determinism(model):
    prompt = torch.tensor([[1, 2, 3]] * 3)
    run = lambda seed: generate(model, prompt, 10, temperature=0.9, top_k=5, top_p=0.9,
                                generator=torch.Generator().manual_seed(seed))
    out = run(1)
    assert out.shape == (3, 13) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, run(1)) and not torch.equal(out, run(2))


def test_greedy_with_cache_equals_argmax_of_full_forward(model):
    out = generate(model, torch.tensor([[4, 5]]), 8, greedy=True)
    sequence = torch.tensor([[4, 5]])
    with torch.no_grad():
        for _ in range(8):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, sequence)


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = torch.softmax(logits, -1)[0]
    kept = ~torch.isinf(filter_logits(logits, top_p=float(probs[1]) + 1e-3))
    assert kept.tolist() == [[False, True, True, False]]
    assert not torch.isinf(filter_logits(logits, top_p=0.01)[0, 1])  # the top token always stays


def test_beam_search_beats_or_matches_greedy(model):
    prompt = torch.tensor([[1, 2]])

    def log_prob(sequence):
        with torch.no_grad():
            logp = torch.log_softmax(model(sequence[:, :-1]).double(), -1)
        return logp[0, 1:].gather(-1, sequence[0, 2:, None]).sum().item()

    greedy = generate(model, prompt, 6, greedy=True)
    beams = beam_search(model, prompt, 6, num_beams=4)
    assert beams.shape == (1, 8) and log_prob(beams) >= log_prob(greedy) - 1e-9
    assert torch.equal(beam_search(model, prompt, 6, num_beams=1), greedy)


def test_beam_search_with_cache_equals_beam_search_by_full_recomputation(model):
    """The cached beams are reordered with their parents (KVCache.reorder): a wrong reorder
    scores a beam's next token with another beam's history and changes the result. Weights x4
    make the fresh model's attention sharp enough that history decides the ranking (at init
    scale a skipped reorder still picks the same beam)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0)
    prompt, num_beams, steps = torch.tensor([[3, 1, 4]]), 3, 7
    beams = prompt.repeat(num_beams, 1)
    scores = torch.full((num_beams,), float("-inf"))
    scores[0] = 0.0
    with torch.no_grad():
        for _ in range(steps):
            log_probs = torch.log_softmax(model(beams)[:, -1].float(), -1)
            scores, flat = torch.topk((scores[:, None] + log_probs).reshape(-1), num_beams)
            beams = torch.cat([beams[flat // log_probs.shape[-1]], (flat % log_probs.shape[-1])[:, None]], dim=1)
    expected = beams[scores.argmax()][None]
    assert torch.equal(beam_search(model, prompt, steps, num_beams=num_beams), expected)


def test_past_max_seq_len_the_context_slides_by_half_windows():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=20, max_seq_len=8, d_model=16, n_layers=1, n_heads=2,
                                  backend="reference")).eval()
    prompt = torch.tensor([[4, 5, 6]])
    out = generate(model, prompt, 17, greedy=True)  # max_seq_len 8: several refills
    sequence, start = prompt, 0
    with torch.no_grad():
        for _ in range(17):
            if sequence.shape[1] - start > 8:  # the window is full: keep its last half
                start = sequence.shape[1] - 4
            sequence = torch.cat([sequence, model(sequence[:, start:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (1, 20) and torch.equal(out, sequence)
    assert torch.equal(beam_search(model, prompt, 17, num_beams=1), out)


def test_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.ones(1, 33, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="'temperature'"):
        generate(model, torch.tensor([[1]]), 2, temperature=0.0)


def test_command_line(model, tmp_path, capsys):
    save_pretrained(model, tmp_path / "export", metadata={"vocab": {"kind": "char", "chars": "abcdefghij klmnopqrs"}})
    main(["--checkpoint", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "5", "--top-k", "3", "--seed", "1"])
    first = capsys.readouterr().out
    main(["--checkpoint", str(tmp_path / "export"), "--prompt", "abc", "--max-new-tokens", "5", "--top-k", "3",
          "--seed", "1"])
    assert capsys.readouterr().out == first and first.startswith("abc") and len(first.strip()) == 8
    main(["--checkpoint", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "5", "--beams", "3"])
    assert capsys.readouterr().out.startswith("abc")
    # More new tokens than max_seq_len (32): all of them, not silently fewer.
    main(["--checkpoint", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "35"])
    assert len(capsys.readouterr().out.strip("\n")) == 38
