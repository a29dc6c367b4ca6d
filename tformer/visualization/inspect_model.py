"""Loading a trained model for inspection: on the reference backend, with its tokenizer."""

from __future__ import annotations

import json
import os

import torch

from tformer.models.pretrained import CONFIG_NAME, MODEL_CLASSES, WEIGHTS_NAME, find_export
from tformer.optional import require


def load_for_inspection(checkpoint: str | os.PathLike, *, device="cpu") -> tuple[torch.nn.Module, dict]:
    """``(model, metadata)`` from an export, rebuilt with ``backend="reference"`` (the path that
    can return attention weights; the weights are the same whatever backend trained them)."""
    load_model = require("safetensors.torch", "load_for_inspection").load_model
    folder = find_export(checkpoint)
    config = json.loads((folder / CONFIG_NAME).read_text())
    model_class = MODEL_CLASSES.get(config.get("model_class"))
    if model_class is None:
        raise ValueError(f"{folder / CONFIG_NAME} names model_class {config.get('model_class')!r}, expected one of "
                         f"{sorted(MODEL_CLASSES)}")
    model = model_class(model_class.config_class.from_dict({**config["model"], "backend": "reference"}))
    load_model(model, str(folder / WEIGHTS_NAME), device=str(device))
    return model.to(device).eval(), config.get("metadata", {})


def tokenize(metadata: dict, text: str) -> tuple[list[int], list[str]]:
    """``(ids, labels)`` of ``text`` by the export's own tokenizer: a character / byte / word
    vocabulary (language models) or the BPE of a classifier; labels are printable token strings."""
    if "vocab" in metadata:
        from tformer.data.text import vocab_from_dict

        vocab = vocab_from_dict(metadata["vocab"])
        ids = vocab.encode(text)
        return ids, [printable(vocab.decode([i])) for i in ids]
    if "tokenizer" in metadata:
        Tokenizer = require("tokenizers", "tokenize").Tokenizer
        tokenizer = Tokenizer.from_str(json.dumps(metadata["tokenizer"]))
        encoding = tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [printable(tokenizer.decode([i])) for i in encoding.ids]
    raise ValueError("the export's metadata holds neither 'vocab' nor 'tokenizer'; cannot encode the text")


def printable(token: str) -> str:
    """A token as a readable axis label (whitespace made visible)."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or "\u2205"
