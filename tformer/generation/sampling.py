"""Text generation from a trained DecoderLM, with the KV cache: temperature, top-k, top-p
(nucleus, Holtzman et al., 2020), greedy decoding and beam search.

The ``tformer sample`` command (:mod:`tformer.cli.sample`) drives it from the command line.
"""

from __future__ import annotations

import math

import torch

from tformer.models import KVCache


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the smallest set whose
    probability reaches ``top_p``; logits ``(B, V)``."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"filter_logits: argument 'top_k' must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"filter_logits: argument 'top_p' must be in (0, 1] (or None), got {top_p}")
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (so the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, greedy: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``(B, V)``: the argmax when ``greedy``, else a
    sample from ``softmax(filter_logits(logits / temperature))``. Returns ``(B, 1)`` int64.
    Shared by the LM's :func:`generate` and the encoder-decoder's decoding
    (:mod:`tformer.generation.seq2seq`)."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"pick_next_tokens: argument 'temperature' must be > 0 (or use greedy=True), got {temperature}")
    probs = torch.softmax(filter_logits(logits / temperature, top_k=top_k, top_p=top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             generator: torch.Generator | None = None, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` ``(B, T0)`` by ``max_new_tokens``; returns ``(B, T0 + N)``.

    The prompt runs once through the model filling the KV cache; each new token then costs one
    single-position forward pass. Past the model's ``max_seq_len`` the context slides: when the
    cache is full it restarts from the last ``max_seq_len // 2`` tokens (one prefill per half
    window, so the cost stays linear). ``cache_dtype``: the dtype keys and values are computed in
    (under autocast or FSDP2 mixed precision it differs from the parameters'); default: the
    parameters' dtype.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: argument 'prompt_ids' must be (B, T0) with T0 >= 1, got {tuple(prompt_ids.shape)}")
    total = _check_prompt_fits("generate", model, prompt_ids, max_new_tokens)
    if not greedy and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"generate: argument 'temperature' must be > 0 (or use greedy=True), got {temperature}")
    was_training = model.training
    model.eval()
    cache = KVCache.for_model(model, prompt_ids.shape[0], max_seq_len=min(total, model.config.max_seq_len),
                              dtype=cache_dtype)
    out = prompt_ids
    logits = model(prompt_ids, cache=cache)[:, -1, :].float()
    for step in range(max_new_tokens):
        next_ids = pick_next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                    generator=generator)
        out = torch.cat([out, next_ids], dim=1)
        if step + 1 < max_new_tokens:
            logits = _next_logits(model, out, cache)
    model.train(was_training)
    return out


@torch.no_grad()
def beam_search(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, num_beams: int = 4,
                length_penalty: float = 0.0) -> torch.Tensor:
    """The highest-scoring continuation of one prompt ``(1, T0)`` under beam search; returns
    ``(1, T0 + N)``. Score = sum of log-probabilities / N**length_penalty (all beams have the
    same length here, so the penalty only matters when comparing across lengths; kept for API
    symmetry). Beams share one KV cache of batch ``num_beams``, reordered each step."""
    if num_beams < 1:
        raise ValueError(f"beam_search: argument 'num_beams' must be >= 1, got {num_beams}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"beam_search: argument 'prompt_ids' must be (1, T0), got {tuple(prompt_ids.shape)}")
    total = _check_prompt_fits("beam_search", model, prompt_ids, max_new_tokens)
    was_training = model.training
    model.eval()
    beams = prompt_ids.repeat(num_beams, 1)
    cache = KVCache.for_model(model, num_beams, max_seq_len=min(total, model.config.max_seq_len))
    log_probs = torch.log_softmax(model(beams, cache=cache)[:, -1, :].float(), dim=-1)
    # Only the first beam is live at the start, so the first step does not pick duplicates.
    scores = torch.full((num_beams,), float("-inf"), device=beams.device)
    scores[0] = 0.0
    vocab = log_probs.shape[-1]
    for step in range(max_new_tokens):
        candidates = (scores[:, None] + log_probs).reshape(-1)
        scores, flat = torch.topk(candidates, num_beams)
        origin, token = flat // vocab, flat % vocab
        beams = torch.cat([beams[origin], token[:, None]], dim=1)
        cache.reorder(origin)
        if step + 1 < max_new_tokens:
            log_probs = torch.log_softmax(_next_logits(model, beams, cache), dim=-1)
    best = torch.argmax(scores / max(max_new_tokens, 1) ** length_penalty)
    model.train(was_training)
    return beams[best:best + 1]


def _check_prompt_fits(caller: str, model, prompt_ids: torch.Tensor, max_new_tokens: int) -> int:
    if prompt_ids.shape[1] > model.config.max_seq_len:
        raise ValueError(f"{caller}: the prompt ({prompt_ids.shape[1]} tokens) is longer than the model's "
                         f"max_seq_len={model.config.max_seq_len}")
    if max_new_tokens < 0:
        raise ValueError(f"{caller}: argument 'max_new_tokens' must be >= 0, got {max_new_tokens}")
    return prompt_ids.shape[1] + max_new_tokens


def _next_logits(model, sequences: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits after the last token of ``sequences`` (B, T), whose earlier tokens are cached.
    A full cache restarts from the last half window: the model has no positions past
    max_seq_len (a learned table), and sliding by one would cost a prefill per token."""
    if cache.length < cache.max_seq_len:
        return model(sequences[:, -1:], cache=cache)[:, -1, :].float()
    cache.reset()
    return model(sequences[:, -max(cache.max_seq_len // 2, 1):], cache=cache)[:, -1, :].float()
