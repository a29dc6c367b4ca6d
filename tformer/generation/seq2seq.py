"""Decoding an :class:`~tformer.models.EncoderDecoderTransformer`: greedy, temperature / top-k /
top-p sampling (the LM's :func:`~tformer.generation.sampling.pick_next_tokens`), and batched
beam search with a length penalty and end-of-sequence handling.

All of them encode once, project the encoder output to each decoder layer's cross-attention
keys and values once (``model.memory_kv``), and run the decoder one token per step over a
:class:`~tformer.models.KVCache` of its self-attention.
"""

from __future__ import annotations

import torch

from tformer.models import KVCache

from .sampling import pick_next_tokens


def _check_lengths(caller: str, model, max_len: int) -> int:
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"{caller}: argument 'max_len' must be a positive int, got {max_len!r}")
    # One position holds BOS; the rest are generated tokens.
    return min(max_len, model.config.max_seq_len - 1)


def _stop(local_done: bool, all_done) -> bool:
    """Whether decoding stops after this step: when this process's rows are done, or, with
    ``all_done`` (data-parallel ranks decoding sharded weights), when every rank's are. Each
    step's forward gathers sharded weights collectively, so every rank must run as many steps;
    finished rows keep stepping (their outputs are masked) until then."""
    return bool(local_done) if all_done is None else bool(all_done(bool(local_done)))


def _strip(row: list[int], eos_id: int) -> list[int]:
    return row[:row.index(eos_id)] if eos_id in row else row


@torch.no_grad()
def decode(model, source: torch.Tensor, source_lengths: torch.Tensor, *, bos_id: int, eos_id: int, max_len: int,
           greedy: bool = True, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, use_cache: bool = True, all_done=None) -> list[list[int]]:
    """Greedy (default) or sampled decoding of a batch; returns each row's tokens without BOS
    and EOS. ``use_cache=False`` reruns the decoder over the whole prefix at every step (the
    reference the cached path is tested against). ``all_done(local_done: bool) -> bool``, given
    under data parallelism, says whether every rank's rows are finished (see :func:`_stop`)."""
    max_len = _check_lengths("decode", model, max_len)
    was_training = model.training
    model.eval()
    memory, padding_mask = model.encode(source, source_lengths)
    memory_kv = model.memory_kv(memory)
    batch = source.shape[0]
    tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=source.device)
    cache = KVCache.for_model(model, batch, max_seq_len=max_len + 1, dtype=memory.dtype) if use_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=source.device)
    for _ in range(max_len):
        step_input = tokens[:, -1:] if use_cache else tokens
        logits = model.decode(step_input, memory_kv, padding_mask, cache=cache)[:, -1, :].float()
        next_ids = pick_next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                    generator=generator)
        next_ids = next_ids.masked_fill(finished[:, None], eos_id)
        tokens = torch.cat([tokens, next_ids], dim=1)
        finished |= next_ids[:, 0] == eos_id
        if _stop(finished.all(), all_done):
            break
    model.train(was_training)
    return [_strip(row[1:], eos_id) for row in tokens.tolist()]


@torch.no_grad()
def beam_search(model, source: torch.Tensor, source_lengths: torch.Tensor, *, bos_id: int, eos_id: int,
                max_len: int, num_beams: int = 4, length_penalty: float = 1.0, all_done=None) -> list[list[int]]:
    """Batched beam search; returns each row's best tokens without BOS and EOS.

    A hypothesis ends when it emits ``eos_id``; its score is the sum of its token
    log-probabilities (EOS included) divided by ``length ** length_penalty`` (length counts
    EOS; ``length_penalty=0`` is the raw sum, larger values favour longer outputs). A row is done
    once it holds ``num_beams`` finished hypotheses; hypotheses still open at ``max_len`` compete
    with the finished ones. The ``B * num_beams`` live beams share one KV cache, reordered
    every step, and the cross-attention keys/values are repeated once per beam. ``all_done``:
    as in :func:`decode`.
    """
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"beam_search: argument 'num_beams' must be a positive int, got {num_beams!r}")
    max_len = _check_lengths("beam_search", model, max_len)
    was_training = model.training
    model.eval()
    batch, beams = source.shape[0], num_beams
    memory, padding_mask = model.encode(source, source_lengths)
    memory = memory.repeat_interleave(beams, dim=0)
    padding_mask = padding_mask.repeat_interleave(beams, dim=0)
    memory_kv = model.memory_kv(memory)
    cache = KVCache.for_model(model, batch * beams, max_seq_len=max_len + 1, dtype=memory.dtype)
    sequences = torch.full((batch * beams, 1), bos_id, dtype=torch.long, device=source.device)
    # Only beam 0 is live at first, so the first step does not pick the same token K times.
    scores = torch.full((batch, beams), float("-inf"), device=source.device)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def normalized(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for step in range(max_len):
        log_probs = torch.log_softmax(model.decode(sequences[:, -1:], memory_kv, padding_mask,
                                                   cache=cache)[:, -1, :].float(), dim=-1)
        vocab = log_probs.shape[-1]
        candidates = (scores[:, :, None] + log_probs.view(batch, beams, vocab)).view(batch, -1)
        top_scores, top_index = candidates.topk(min(2 * beams, candidates.shape[1]), dim=-1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        rows, tokens, new_scores = [], [], []
        for item in range(batch):
            kept = 0
            for score, flat in zip(top_scores[item], top_index[item]):
                if kept == beams:
                    break
                beam, token = divmod(flat, vocab)
                row = item * beams + beam
                if done[item] or score == float("-inf"):
                    # A finished row keeps decoding dummy beams that nobody reads.
                    rows.append(row), tokens.append(eos_id), new_scores.append(float("-inf"))
                    kept += 1
                elif token == eos_id:
                    finished[item].append((normalized(score, step + 1), sequences[row, 1:].tolist()))
                else:
                    rows.append(row), tokens.append(token), new_scores.append(score)
                    kept += 1
            while kept < beams:  # every candidate was EOS or -inf: pad with dead beams
                rows.append(item * beams), tokens.append(eos_id), new_scores.append(float("-inf"))
                kept += 1
            if len(finished[item]) >= beams:
                done[item] = True
        index = torch.tensor(rows, device=source.device)
        sequences = torch.cat([sequences[index], torch.tensor(tokens, device=source.device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=source.device).view(batch, beams)
        cache.reorder(index)
        if _stop(all(done), all_done):
            break
    results = []
    for item in range(batch):
        candidates = list(finished[item])
        for beam in range(beams):
            score = scores[item, beam].item()
            if score != float("-inf"):
                tokens_so_far = sequences[item * beams + beam, 1:].tolist()
                candidates.append((normalized(score, len(tokens_so_far)), tokens_so_far))
        best = max(candidates, key=lambda pair: pair[0])[1] if candidates else []
        results.append(_strip(best, eos_id))
    model.train(was_training)
    return results
