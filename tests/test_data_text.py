"""Text files as character streams, and the resumable random-window sampler."""

import numpy as np
import pytest
import torch

from tformer.data.sampler import RandomWindowSampler, evaluation_windows
from tformer.data.text import CharVocab, load_text_splits, tiny_shakespeare_path

from train_helpers import TEXT, write_text


def test_tiny_shakespeare_ships_in_the_package():
    splits, vocab = load_text_splits()
    assert vocab.size == 65 and tiny_shakespeare_path().is_file()
    assert len(splits["train"]) == 1003854 and len(splits["train"]) + len(splits["val"]) == 1115394


def test_text_file_split_and_round_trip(tmp_path):
    splits, vocab = load_text_splits(write_text(tmp_path))
    assert len(splits["train"]) == int(len(TEXT) * 0.9)
    assert vocab.decode(np.concatenate([splits["train"], splits["val"]])) == TEXT
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.encode("ZZZ~")
    with pytest.raises(FileNotFoundError, match="'path'"):
        load_text_splits(tmp_path / "missing.txt")


def test_sampler_targets_are_shifted_inputs_and_state_resumes():
    tokens = np.arange(1000, dtype=np.int64) % 251
    sampler = RandomWindowSampler(tokens, 8, 3, seed=5)
    inputs, targets = sampler.next_batch()
    assert inputs.shape == (3, 8) and torch.equal(inputs[:, 1:], targets[:, :-1])
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    fresh = RandomWindowSampler(tokens, 8, 3, seed=999)
    fresh.load_state_dict(state)
    for (a, b), (c, d) in zip(expected, (fresh.next_batch() for _ in range(3))):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_ranks_split_the_single_process_global_batch():
    tokens = np.arange(5000, dtype=np.int64)
    whole = RandomWindowSampler(tokens, 8, 4, seed=1).next_batch()[0]
    parts = [RandomWindowSampler(tokens, 8, 2, seed=1, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("num_tokens, seq_len", [(101, 10), (100, 10), (37, 8), (9, 8)])
def test_evaluation_windows_count_every_target_once(num_tokens, seq_len):
    counted = np.zeros(num_tokens, dtype=int)
    for start, first in evaluation_windows(num_tokens, seq_len):
        counted[start + 1 + first:start + 1 + seq_len] += 1
    assert counted[0] == 0 and (counted[1:] == 1).all()


def test_char_vocab_rejects_repeats():
    with pytest.raises(ValueError, match="'chars'"):
        CharVocab("aa")
