"""``EncoderMaskedLM``: the encoder classifier's trunk with a masked-language-model head, for
self-pretraining (Devlin et al. 2019, BERT; on the task's own text: Krishna et al. 2022,
"Downstream Datasets Make Surprisingly Good Pretraining Corpora")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tformer.nn import make_norm

from .config import EncoderClassifierConfig
from .encoder_classifier import EncoderClassifier


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + norm, then the output projection, which is the
    token embedding matrix itself (tied, passed in at call time) plus a per-token bias."""

    def __init__(self, config: EncoderClassifierConfig):
        super().__init__()
        self.transform = nn.Linear(config.d_model, config.d_model)
        self.norm = make_norm(config.norm, config.d_model, bias=config.bias, backend=config.backend)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.transform.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.transform.bias)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """hidden ``(N, d_model)``, embedding_weight ``(vocab_size, d_model)`` -> logits ``(N, vocab_size)``."""
        hidden = self.norm(F.gelu(self.transform(hidden)))
        return F.linear(hidden, embedding_weight, self.output_bias)


class EncoderMaskedLM(EncoderClassifier):
    """An :class:`EncoderClassifier` whose ``head`` predicts masked tokens instead of classes.

    Everything outside ``head`` (token embedding, positional encoding, CLS embedding with
    ``pooling="cls"``, ``blocks``, final norm) is the classifier's by construction: same
    modules, parameter names and shapes, so a classifier can start from these weights
    (``training.init_from``). ``pooling`` only decides whether the CLS position is there
    (it is then trained through attention, and the position table matches); ``num_classes``
    is unused.
    """

    def __init__(self, config: EncoderClassifierConfig):
        super().__init__(config)
        self.head = MaskedLMHead(config)  # replaces the classification head

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                prediction_positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens ``(B, S)`` int64, key_padding_mask ``(B, S)`` bool (True = padding),
        prediction_positions ``(N,)`` int64 indices into the flattened ``(B * S)`` token
        positions -> logits ``(N, vocab_size)`` at those positions only (``(B, S, vocab_size)``
        at every position when ``prediction_positions`` is None).

        Gathering before the head skips the vocabulary projection at the ~85% of positions that
        carry no loss; the indices come precomputed, so no device-to-host sync (as a boolean
        mask's ``nonzero`` would need) happens inside the forward pass.
        """
        hidden, _ = self.encode(tokens, key_padding_mask)
        if self.uses_cls:
            hidden = hidden[:, 1:]  # the CLS position predicts nothing
        if prediction_positions is None:
            return self.head(hidden, self.token_embedding.weight)
        if prediction_positions.dim() != 1 or prediction_positions.dtype != torch.long:
            raise ValueError(f"EncoderMaskedLM: argument 'prediction_positions' must be a (N,) int64 tensor, got "
                             f"shape {tuple(prediction_positions.shape)} and dtype {prediction_positions.dtype}")
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, prediction_positions)
        return self.head(selected, self.token_embedding.weight)
