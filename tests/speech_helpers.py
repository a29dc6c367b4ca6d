"""A tiny espeak-ng corpus shared by the speech tests (a handful of utterances)."""

import shutil

import pytest

from tformer.data.speech_corpus import CorpusSpec

requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                     reason="needs the espeak-ng program (apt-get install -y espeak-ng)")

# Two training voices, one validation and one test voice, short sentences.
TINY_SPEC = CorpusSpec(train_per_voice=3, val_per_voice=2, test_per_voice=2, max_chars=20,
                       voices={"train": ["en-us+m1", "en-gb+f2"], "val": ["en-gb-x-rp+m3"], "test": ["en-us+f4"]})
