"""WikiText-2 (wikitext-2-raw-v1) on a small sample in the release's format: word and character
level, the lm task's data source, perplexity per word."""

import numpy as np
import pytest

from tformer.data.text import vocab_from_dict
from tformer.data.wikitext import EOS, UNK, load_wikitext
from tformer.schema import ConfigError
from tformer.training.config import load_config
from tformer.training.trainer import Trainer

from train_helpers import tiny_config

# The release's layout: " = Title = " headings, blank lines as " ", tokens split by spaces,
# " @-@ " for intra-word hyphens; every line ends with a newline.
TRAIN = (" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a tactical role @-@ playing video game . \n"
         " The game began development in 2010 , carrying over a large portion of the work . \n \n") * 30
VALID = " \n = Homarus gammarus = \n \n The game is a large lobster . \n"
TEST = " \n = Robert Boulter = \n \n Robert Boulter is an English actor . \n"


def write_sample(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("wiki.train.raw", TRAIN), ("wiki.valid.raw", VALID), ("wiki.test.raw", TEST)):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_word_level_lines_end_with_eos_and_unseen_words_are_unk(tmp_path):
    splits, vocab = load_wikitext(write_sample(tmp_path / "wikitext-2-raw"), "word")
    assert vocab.words[:2] == [UNK, EOS] and vocab.kind == "word"
    words = [vocab.words[i] for i in splits["val"]]
    # 4 lines -> 4 <eos>; "Homarus", "gammarus", "lobster" never occur in train.
    assert words == [EOS, "=", UNK, UNK, "=", EOS, EOS, "The", "game", "is", "a", "large", UNK, ".", EOS]
    assert splits["train"].dtype == np.uint16 and len(splits["train"]) == 30 * (1 + 6 + 1 + 14 + 17 + 1)
    assert "@-@" in vocab.words and "Senjō" in vocab.words
    assert vocab.decode(vocab.encode("The game\nis")) == "The game\nis"
    assert vocab_from_dict(vocab.to_dict()).words == vocab.words


def test_min_count_and_char_level(tmp_path):
    folder = write_sample(tmp_path)
    _, frequent = load_wikitext(folder, "word", min_count=31)  # training words occur 30 or 60 times
    assert {"=", "game", "Valkyria", "."} <= set(frequent.words) and "tactical" not in frequent.words
    assert load_wikitext(folder, "word", min_count=61)[1].words == [UNK, EOS]
    splits, vocab = load_wikitext(folder, "char")
    assert vocab.kind == "char" and "ō" in vocab.chars
    assert vocab.decode(splits["test"]) == TEST


def test_missing_files_and_bad_level_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="wiki.train.raw"):
        load_wikitext(tmp_path, "word")
    with pytest.raises(ValueError, match="'level' must be one of"):
        load_wikitext(write_sample(tmp_path), "bpe")
    with pytest.raises(ConfigError, match="data.source='wikitext2' needs data.path"):
        load_config(tiny_config(tmp_path, data={"source": "wikitext2", "path": None}))


@pytest.mark.parametrize("level, metrics", [("word", {"val/ppl", "test/ppl"}), ("char", {"val/bpc", "test/bpc"})])
def test_lm_task_trains_on_wikitext_and_reports_accordingly(tmp_path, level, metrics):
    config = load_config(tiny_config(tmp_path, data={"source": "wikitext2", "path": str(write_sample(tmp_path / "wt")),
                                                     "level": level, "seq_len": 8}, run={"steps": 2}))
    final = Trainer(config).fit()[-1]
    assert metrics <= set(final)
    if level == "word":
        assert "val/bpc" not in final  # a per-word loss is not bits per character
    assert final["val/ppl"] > 1.0
