"""The sm_90a kernels' banded block ranges (csrc/attention_sm90/band.h), mirrored, and the
brute-force check they must pass.

- `SequenceBand` mirrors band.h line for line (tests/test_sm90_contracts.py compiles the header
  with the host compiler and compares the two on every case).
- `check_ranges` takes a band's ranges and mask decisions, however computed (the header's, the
  mirror's, a deliberately broken one's), and compares them with the mask of
  tformer.ops.attention_mask.allowed_keys: every allowed (query, key) pair lies in a visited
  block, the first and last visited blocks hold an allowed pair (nothing skippable is visited),
  and a block said to need no mask holds no disallowed pair among the rows it serves.
- `emulate_forward` / `emulate_backward` run the banded kernels' arithmetic block by block in
  float64 (the ranges, cuts() and the row intervals above; the soft-cap in raw units).
- The block sizes come from csrc/attention_sm90/contracts.h (read_constants): the forward's query
  and key blocks (kBoxRows), the backward's blocks (kGradBlock) and steps (grad_step), and the
  warpgroup's rows (kWgmmaM) over which the forward decides whether to mask.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90_layout_model import grad_step, read_constants  # noqa: E402

from tformer.ops.attention_mask import Band, allowed_keys  # noqa: E402


def _clamp(x: int, low: int, high: int) -> int:
    return low if x < low else (high if x > high else x)


@dataclass(frozen=True)
class SequenceBand:
    """band.h's SequenceBand."""
    q_len: int
    k_len: int
    offset: int
    left: int
    right: int

    def allows(self, row: int, col: int) -> bool:
        return (self.right < 0 or col <= row + self.offset + self.right) and \
            (self.left < 0 or col >= row + self.offset - self.left)

    UNBOUNDED = 1 << 62  # an unbounded side of an interval (band.h's kUnbounded: any value past every index)

    def row_keys_first(self, row: int) -> int:  # band.h's row_keys(row).first
        return -self.UNBOUNDED if self.left < 0 else row + self.offset - self.left

    def row_keys_last(self, row: int) -> int:  # band.h's row_keys(row).last
        return self.UNBOUNDED if self.right < 0 else row + self.offset + self.right

    def first_key(self, row_begin: int) -> int:
        return 0 if self.left < 0 else _clamp(row_begin + self.offset - self.left, 0, self.k_len)

    def key_end(self, row_end: int) -> int:
        return self.k_len if self.right < 0 else _clamp(row_end + self.offset + self.right, 0, self.k_len)

    def first_row(self, col_begin: int) -> int:
        return 0 if self.right < 0 else _clamp(col_begin - self.offset - self.right, 0, self.q_len)

    def row_end(self, col_end: int) -> int:
        return self.q_len if self.left < 0 else _clamp(col_end - self.offset + self.left, 0, self.q_len)

    def key_blocks(self, m0: int, block_m: int, block_n: int) -> tuple[int, int]:
        first, end = self.first_key(m0), self.key_end(min(m0 + block_m, self.q_len))
        return (0, 0) if first >= end else (first // block_n, -(-end // block_n))

    def query_blocks(self, n0: int, block_n: int, block_m: int) -> tuple[int, int]:
        first, end = self.first_row(n0), self.row_end(min(n0 + block_n, self.k_len))
        return (0, 0) if first >= end else (first // block_m, -(-end // block_m))

    def cuts(self, row_first: int, row_last: int, n0: int, block_n: int) -> bool:
        past_right = self.right >= 0 and n0 + block_n - 1 > row_first + self.offset + self.right
        before_left = self.left >= 0 and n0 < row_last + self.offset - self.left
        return n0 + block_n > self.k_len or past_right or before_left


def sequence_band(q_len: int, k_len: int, left: int, right: int, bottom_right: bool) -> SequenceBand:
    return SequenceBand(q_len, k_len, k_len - q_len if bottom_right else 0, left, right)


class KeyEndOffByOne(SequenceBand):
    """A broken band: the last key block dropped when the band ends exactly on a block boundary
    plus one key (key_end off by one)."""

    def key_end(self, row_end: int) -> int:
        return self.k_len if self.right < 0 else _clamp(row_end + self.offset + self.right - 1, 0, self.k_len)


class CutsIgnoresLeftEdge(SequenceBand):
    """A broken band: blocks cut only by the window's left edge are run unmasked."""

    def cuts(self, row_first: int, row_last: int, n0: int, block_n: int) -> bool:
        past_right = self.right >= 0 and n0 + block_n - 1 > row_first + self.offset + self.right
        return n0 + block_n > self.k_len or past_right


def block_sizes(head_dim: int, c: dict[str, int] | None = None) -> dict[str, int]:
    """The kernels' block sizes at this head dim, from contracts.h."""
    c = c or read_constants()
    return {"forward": c["kBoxRows"], "rows_masked": c["kWgmmaM"], "grad_block": c["kGradBlock"],
            "grad_step": grad_step(head_dim, c)}


@dataclass(frozen=True)
class BandRanges:
    """What a band's kernels do, for one sequence: per forward query block its key blocks and, per
    warpgroup (64-row part) and visited key block, whether it masks; per backward key block its
    query steps; per backward query block its key steps."""
    forward: list[tuple[int, int]]
    forward_masked: list[list[list[bool]]]
    key_grad: list[tuple[int, int]]
    query_grad: list[tuple[int, int]]


def band_ranges(band: SequenceBand, sizes: dict[str, int]) -> BandRanges:
    """The ranges as the kernels compute them from `band` (a SequenceBand or a broken variant)."""
    block, rows, grad_block, step = sizes["forward"], sizes["rows_masked"], sizes["grad_block"], sizes["grad_step"]
    forward, masked = [], []
    for m0 in range(0, band.q_len, block):
        first, end = band.key_blocks(m0, block, block)
        forward.append((first, end))
        masked.append([[band.cuts(r0, r0 + rows - 1, n * block, block) for n in range(first, end)]
                       for r0 in range(m0, m0 + block, rows)])
    key_grad = [band.query_blocks(n0, grad_block, step) for n0 in range(0, band.k_len, grad_block)]
    query_grad = [band.key_blocks(m0, grad_block, step) for m0 in range(0, band.q_len, grad_block)]
    return BandRanges(forward, masked, key_grad, query_grad)


def brute_force_mask(q_len: int, k_len: int, left: int, right: int, bottom_right: bool) -> torch.Tensor:
    """Bool (q_len, k_len) from tformer.ops.attention_mask.allowed_keys."""
    allowed = allowed_keys(q_len, k_len, Band(left, right, bottom_right), None)
    return torch.ones(q_len, k_len, dtype=torch.bool) if allowed is None else allowed[0, 0]


def _check_range(allowed: torch.Tensor, first: int, end: int, size: int, where: str) -> list[str]:
    """`allowed`: (rows this block owns, every key or query along the other axis), blocks of `size`."""
    errors = []
    reached = allowed.any(0).nonzero().flatten().tolist()
    if not reached:
        if end > first:
            errors.append(f"{where}: visits blocks [{first}, {end}) though no pair is allowed")
        return errors
    want_first, want_end = reached[0] // size, reached[-1] // size + 1
    if (first, end) != (want_first, want_end):
        errors.append(f"{where}: visits blocks [{first}, {end}), the allowed pairs span [{want_first}, {want_end})")
    return errors


def check_ranges(ranges: BandRanges, q_len: int, k_len: int, left: int, right: int, bottom_right: bool,
                 sizes: dict[str, int]) -> list[str]:
    """Every way `ranges` disagrees with the brute-force mask."""
    allowed = brute_force_mask(q_len, k_len, left, right, bottom_right)
    case = f"Sq={q_len} Sk={k_len} window=({left}, {right}) {'bottom_right' if bottom_right else 'top_left'}"
    block, rows, grad_block, step = sizes["forward"], sizes["rows_masked"], sizes["grad_block"], sizes["grad_step"]
    errors = []
    for i, ((first, end), masked) in enumerate(zip(ranges.forward, ranges.forward_masked)):
        m0 = i * block
        errors += _check_range(allowed[m0:m0 + block], first, end, block, f"{case}: forward query block {i}")
        for part, flags in enumerate(masked):
            r0 = m0 + part * rows
            for n, needs_mask in zip(range(first, end), flags):
                # Rows past q_len are never stored: only the sequence's rows must be all allowed,
                # and every key of the block must exist.
                tile = allowed[r0:r0 + rows, n * block:(n + 1) * block]
                if not needs_mask and ((n + 1) * block > k_len or not bool(tile.all())):
                    errors.append(f"{case}: forward rows {r0}.. key block {n} runs unmasked but holds a "
                                  "disallowed pair")
    for i, (first, end) in enumerate(ranges.key_grad):
        n0 = i * grad_block
        errors += _check_range(allowed[:, n0:n0 + grad_block].T, first, end, step,
                               f"{case}: dK/dV key block {i} (query steps of {step})")
    for i, (first, end) in enumerate(ranges.query_grad):
        m0 = i * grad_block
        errors += _check_range(allowed[m0:m0 + grad_block], first, end, step,
                               f"{case}: dQ query block {i} (key steps of {step})")
    return errors


def band_cases(c: dict[str, int] | None = None) -> list[tuple[int, int, int, int, bool]]:
    """(q_len, k_len, left, right, bottom_right): lengths around the block sizes (1, 17, one
    block +- 1, 1000), windows narrower and wider than a block, ending on block edges, two-sided,
    causal sliding, Sq != Sk both ways with both alignments (rows with no key), empty windows."""
    c = c or read_constants()
    block = c["kBoxRows"]
    lengths = (1, 17, block - 1, block, block + 1, 2 * block + 3, 1000)
    windows = ((-1, -1), (-1, 0), (2 * block, 0), (block, block), (0, 0), (block - 1, 1), (-1, block + 1),
               (3, -1), (block + 1, -1), (1, 2 * block))
    cases = []
    for q_len in lengths:
        for k_len in lengths:
            for left, right in windows:
                for bottom_right in (False, True):
                    if bottom_right and q_len == k_len:
                        continue  # the same band as top-left
                    cases.append((q_len, k_len, left, right, bottom_right))
    return cases


# ---- the banded kernels' arithmetic, block by block, in float64 --------------------------------
def _mask(scores, rows, cols, band):
    """-inf where the band (band.h's row_keys) or the sequence's end removes a key."""
    first = torch.tensor([band.row_keys_first(r) for r in rows], dtype=torch.long)[:, None]
    last = torch.tensor([band.row_keys_last(r) for r in rows], dtype=torch.long)[:, None]
    keys = torch.tensor(list(cols), dtype=torch.long)[None, :]
    allowed = (keys >= first) & (keys <= last) & (keys < band.k_len)
    return scores.masked_fill(~allowed, -torch.inf), allowed


def _capped(raw, scale: float, softcap: float):
    """forward_sm90.cuh / backward_sm90.cuh: the score in raw units, (softcap / scale) tanh(s scale /
    softcap), and dS's factor 1 - tanh^2; (raw, 1) without a cap."""
    if softcap == 0:
        return raw, torch.ones_like(raw)
    t = torch.tanh(raw * (scale / softcap))
    return t * (softcap / scale), 1 - t * t


def emulate_forward(q, k, v, band: SequenceBand, scale: float, softcap: float, sizes: dict[str, int]):
    """The banded forward of one head: per query block its key_blocks, per 64-row part a block
    masked only where cuts() says so, the online softmax in log2 units on raw (capped) scores
    scaled in the exponent. q (Sq, D), k and v (Sk, D), float64 -> out (Sq, D), lse (Sq,)."""
    block, part_rows = sizes["forward"], sizes["rows_masked"]
    log2e = 1 / math.log(2)
    out, lse = torch.zeros_like(q), torch.full((band.q_len,), -torch.inf, dtype=q.dtype)
    for m0 in range(0, band.q_len, block):
        first, end = band.key_blocks(m0, block, block)
        for r0 in range(m0, min(m0 + block, band.q_len), part_rows):
            rows = range(r0, min(r0 + part_rows, band.q_len))
            row_max = torch.full((len(rows),), -torch.inf, dtype=q.dtype)
            row_sum, o = torch.zeros(len(rows), dtype=q.dtype), torch.zeros(len(rows), q.shape[1], dtype=q.dtype)
            for n in range(first, end):
                cols = range(n * block, min((n + 1) * block, band.k_len))
                s = _capped(q[r0:rows.stop] @ k[cols.start:cols.stop].T, scale, softcap)[0]
                if band.cuts(r0, r0 + part_rows - 1, n * block, block):
                    s = _mask(s, rows, cols, band)[0]
                new_max = torch.maximum(row_max, s.max(1).values * scale * log2e)
                safe = torch.where(new_max == -torch.inf, 0.0, new_max)
                alpha = torch.exp2(row_max - safe)
                p = torch.exp2(s * scale * log2e - safe[:, None])
                row_sum, row_max = row_sum * alpha + p.sum(1), new_max
                o = o * alpha[:, None] + p @ v[cols.start:cols.stop]
            has_key = row_sum > 0
            out[r0:rows.stop] = torch.where(has_key[:, None], o / row_sum.clamp_min(1e-300)[:, None], 0.0)
            lse[r0:rows.stop] = torch.where(has_key, (row_max + torch.log2(row_sum.clamp_min(1e-300))) / log2e,
                                            -torch.inf)
    return out, lse


def emulate_backward(q, k, v, dout, out, lse, band: SequenceBand, scale: float, softcap: float,
                     sizes: dict[str, int]):
    """The banded backward of one head: dK/dV per 128-key block over its query_blocks steps, dQ per
    128-query block over its key_blocks steps, every element masked by the band, P from the
    forward's lse, dS = P (dP - delta) (1 - tanh^2). -> dq, dk, dv."""
    grad_block, step = sizes["grad_block"], sizes["grad_step"]
    delta = (dout * out).sum(1)
    lse_safe = torch.where(lse == -torch.inf, 0.0, lse)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def tile(rows, cols):  # P and dS of rows x cols, masked
        raw = q[rows.start:rows.stop] @ k[cols.start:cols.stop].T
        capped, slope = _capped(raw, scale, softcap)
        _, allowed = _mask(capped, rows, cols, band)
        p = torch.where(allowed, torch.exp(capped * scale - lse_safe[rows.start:rows.stop, None]), 0.0)
        dp = dout[rows.start:rows.stop] @ v[cols.start:cols.stop].T
        return p, p * (dp - delta[rows.start:rows.stop, None]) * slope

    for n0 in range(0, band.k_len, grad_block):
        cols = range(n0, min(n0 + grad_block, band.k_len))
        first, end = band.query_blocks(n0, grad_block, step)
        for m in range(first, end):
            rows = range(m * step, min((m + 1) * step, band.q_len))
            p, ds = tile(rows, cols)
            dv[cols.start:cols.stop] += p.T @ dout[rows.start:rows.stop]
            dk[cols.start:cols.stop] += scale * ds.T @ q[rows.start:rows.stop]
    for m0 in range(0, band.q_len, grad_block):
        rows = range(m0, min(m0 + grad_block, band.q_len))
        first, end = band.key_blocks(m0, grad_block, step)
        for n in range(first, end):
            cols = range(n * step, min((n + 1) * step, band.k_len))
            dq[rows.start:rows.stop] += scale * tile(rows, cols)[1] @ k[cols.start:cols.stop]
    return dq, dk, dv
