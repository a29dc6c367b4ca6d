"""The CoNLL-2003 / IOB2 reader on the hand-made sample and on each kind of bad input, sub-word
label alignment, the synthetic corpus, and entity F1 against conlleval's figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tformer.data import bpe
from tformer.data.conll import IGNORE_INDEX, ConllFormatError, align_labels, read_conll, tag_names, write_conll
from tformer.data.synthetic_ner import synthetic_ner_corpus
from tformer.tasks.multitask_metrics import entity_metrics

SAMPLE = Path(__file__).parent / "samples" / "conll_sample.txt"
TYPES = ("PER", "LOC", "ORG", "MISC")


def test_reads_the_hand_made_sample():
    sentences = read_conll(SAMPLE, entity_types=TYPES)
    assert [len(s.words) for s in sentences] == [10, 5, 12, 4]  # -DOCSTART- lines are no sentence
    assert sentences[0].words[:2] == ["Lena", "Ortiz"] and sentences[0].tags[:2] == ["B-PER", "I-PER"]
    assert sentences[2].tags[1:4] == ["B-ORG", "I-ORG", "I-ORG"]
    assert tag_names(sentences) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, line, message", [
    ("Anna B-PER\nflew O\nto O O\n", 3, "expected 2 columns"),  # wrong column count
    ("Anna B-PER\nflew X\n", 2, "unknown tag 'X'"),  # malformed tag
    ("Anna B-PER\nflew B-FOO\n", 2, "unknown entity type"),  # a type outside entity_types
    ("The O\nRiver I-LOC\n", 2, "never begun"),  # I- after O
    ("Anna B-PER\nOslo I-LOC\n", 2, "never begun"),  # I- of another type
    ("\n\n", None, "holds no sentence"),
    ("Anna\n", 1, "at least 2 columns"),
])
def test_bad_input_names_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConllFormatError, match=message) as error:
        read_conll(path, entity_types=TYPES)
    assert str(path) in str(error.value)
    if line is not None:
        assert f"{path}:{line}:" in str(error.value)


def test_iob1_starts_become_b_and_missing_file_is_named(tmp_path):
    path = write(tmp_path, "The O\nRiver I-LOC\nThames I-LOC\n\nAnna I-PER\nBerg I-PER\n")
    sentences = read_conll(path, scheme="iob1")
    assert [s.tags for s in sentences] == [["O", "B-LOC", "I-LOC"], ["B-PER", "I-PER"]]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_conll(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="scheme"):
        read_conll(path, scheme="bio")


def test_write_then_read_round_trips(tmp_path):
    corpus = synthetic_ner_corpus(20, seed=3)
    assert read_conll(write_conll(corpus, tmp_path / "synthetic.txt")) == corpus
    assert synthetic_ner_corpus(20, seed=3) == corpus and synthetic_ner_corpus(20, seed=4) != corpus


def test_first_sub_token_carries_the_label():
    assert align_labels([None, 0, 0, 1, 2, 2, 2, None], [5, 6, 7]) == [
        IGNORE_INDEX, 5, IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    tokenizer = bpe.train_bpe(["Anna flew to Paris"] * 4, 300)
    words = ["Anna", "Bergstromberg", "flew"]  # the rare word splits into several tokens
    encoding = tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
    labels = align_labels(encoding.word_ids, [1, 2, 0])
    assert len(encoding.ids) > 3 and len(labels) == len(encoding.ids)
    assert [label for label in labels if label != IGNORE_INDEX] == [1, 2, 0]
    assert labels[1] == 2 and set(labels[2:-1]) == {IGNORE_INDEX}


# conlleval's figures (the CoNLL shared tasks' scorer, version 2004-01-26, run on each case):
# (tokens, true entities, predicted entities, correct entities, correct tags).
CONLLEVAL_CASES = {
    # An I- that follows no entity of its type begins one, for the truth and the prediction.
    "i_without_b": ([["B-PER", "I-PER", "O", "B-LOC"]], [["I-PER", "I-PER", "O", "I-LOC"]], "iob2", (4, 2, 2, 2, 2)),
    "stray_i_after_other_type": ([["B-PER", "I-PER", "I-PER", "O"]], [["B-PER", "I-LOC", "I-PER", "O"]], "iob2",
                                 (4, 1, 3, 0, 3)),
    "adjacent_same_type": ([["B-PER", "B-PER", "O", "B-ORG", "I-ORG", "B-ORG"]],
                           [["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "B-ORG"]], "iob2", (6, 4, 3, 2, 5)),
    # The same entities written in IOB1 and in IOB2 score alike.
    "iob1_input": ([["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "O"]], [["I-PER", "I-PER", "O", "I-LOC", "I-LOC", "I-MISC"]],
                   "iob1", (6, 3, 3, 1, 4)),
    "iob2_of_the_same": ([["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O"]],
                         [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-MISC"]], "iob2", (6, 3, 3, 1, 4)),
    "empty_sentences": ([[], ["B-PER", "O"], [], ["O"]], [[], ["B-PER", "O"], [], ["B-ORG"]], "iob2", (3, 1, 2, 1, 2)),
    "type_change_inside": ([["B-PER", "I-PER", "O"]], [["B-PER", "I-ORG", "O"]], "iob2", (3, 1, 2, 0, 2)),
}


def _conlleval_scores(tokens, true_entities, predicted_entities, correct_entities, correct_tags):
    precision = correct_entities / predicted_entities if predicted_entities else 0.0
    recall = correct_entities / true_entities if true_entities else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "token_accuracy": correct_tags / tokens}


@pytest.mark.parametrize("case", sorted(CONLLEVAL_CASES))
def test_entity_metrics_give_conllevals_figures(case):
    true, predicted, scheme, figures = CONLLEVAL_CASES[case]
    assert entity_metrics(true, predicted, scheme=scheme) == pytest.approx(_conlleval_scores(*figures))


def test_entity_metrics_on_the_shipped_sample_give_conllevals_figures():
    true = [sentence.tags for sentence in read_conll(SAMPLE)]
    # A fixed damage of the truth: every third entity token typed MISC, every fifth other token O.
    predicted = [["B-PER", "I-PER", "O", "O", "O", "O", "O", "B-ORG", "I-MISC", "O"], ["O", "O", "O", "B-LOC", "O"],
                 ["O", "B-ORG", "I-MISC", "I-ORG", "O", "O", "O", "B-LOC", "I-MISC", "O", "O", "O"],
                 ["O", "O", "B-MISC", "O"]]
    assert entity_metrics(true, predicted) == pytest.approx(_conlleval_scores(31, 7, 10, 2, 26))
    assert entity_metrics(true, true)["f1"] == 1.0


def test_entity_metrics_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"],  # PER right; LOC typed wrong (1 FP ORG, 1 FN LOC)
                 ["B-ORG", "O", "O"]]  # ORG right; PER missed (1 FN)
    # 4 true entities, 3 predicted, 2 exact matches: P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7.
    metrics = entity_metrics(true, predicted)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(0.5)
    assert metrics["f1"] == pytest.approx(4 / 7)
    assert metrics["token_accuracy"] == pytest.approx(5 / 7)
    # A boundary error is a miss too: half an entity earns nothing.
    assert entity_metrics([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="as many"):
        entity_metrics([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="'scheme'.*'bio'"):
        entity_metrics([["O"]], [["O"]], scheme="bio")