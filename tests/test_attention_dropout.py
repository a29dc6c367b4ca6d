"""The Triton attention dropout mask (tformer.kernels.dropout): exactly Philox4x32-10 with one
call per four adjacent key columns, no counter wrap for large indices, a keep rate of 1 - p
within a binomial bound, and different masks per batch, head and seed. Forward/backward mask
agreement is tested in test_attention.py (test_dropout_gradients_use_the_forward_mask)."""

import math

import numpy as np
import pytest
import torch

from tformer.ops import attention

from conftest import DEVICE, requires_backend

pytestmark = requires_backend("triton")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from tformer.kernels.dropout import dropout_keep  # noqa: E402  (needs Triton)


def philox4x32_10(seed: int, counter: list[np.ndarray]) -> list[np.ndarray]:
    """Philox4x32 with 10 rounds (Salmon et al. 2011), key = (seed low, seed high 32 bits),
    as Triton's tl.philox computes it; uint64 arrays hold the 32-bit words."""
    mask32 = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) & mask32 for word in counter)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        product0, product2 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (((product2 >> np.uint64(32)) ^ c1 ^ k0) & mask32, product2 & mask32,
                          ((product0 >> np.uint64(32)) ^ c3 ^ k1) & mask32, product0 & mask32)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    return [c0, c1, c2, c3]


@triton.jit
def _store_mask(Out, seed, dropout_p, batch_head, first_row, first_col, M: tl.constexpr, N: tl.constexpr):
    keep = dropout_keep(seed, dropout_p, batch_head, first_row + tl.arange(0, M), first_col + tl.arange(0, N))
    tl.store(Out + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], keep.to(tl.int8))


# (seed, p, batch_head, first row, first col): small indices, then indices near 2^31 and a
# batch x head index past 2^32 (a single 64-bit element index would be ~2^125 there).
MASK_CASES = [(7, 0.3, 0, 0, 0), (2**61 + 5, 0.1, 2**33 + 3, 2**31 - 16, 2**31 - 64), (123, 0.9, 5, 33, 48)]


@pytest.mark.parametrize("seed, p, batch_head, first_row, first_col", MASK_CASES)
def test_mask_is_philox_per_four_columns(seed, p, batch_head, first_row, first_col):
    rows_n, cols_n = 16, 32
    got = torch.empty(rows_n, cols_n, dtype=torch.int8, device=DEVICE)
    _store_mask[(1,)](got, seed, p, batch_head, first_row, first_col, M=rows_n, N=cols_n)

    # Plain NumPy implementation: counter (col // 4, row, batch_head low, high), word col % 4.
    rows = np.arange(first_row, first_row + rows_n, dtype=np.int64)[:, None] + np.zeros((1, cols_n), np.int64)
    cols = np.arange(first_col, first_col + cols_n, dtype=np.int64)[None, :] + np.zeros((rows_n, 1), np.int64)
    words = philox4x32_10(seed, [cols // 4, rows, batch_head & 0xFFFFFFFF, batch_head >> 32])
    threshold = int(np.float32(p) * np.float32(2**32))
    expected = np.choose(cols % 4, words) >= threshold

    # Check results
    assert np.array_equal(got.cpu().numpy().astype(bool), expected)


def _kept(seed, p, shape=(2, 3, 64, 64)):
    """(B, H, Sq, Sk) bool kept mask of one Triton forward, read through v = identity (every
    probability is > 0 without a causal or padding mask, so 0 means dropped)."""
    batch, heads, seq_q, seq_k = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, seq_q, seq_k, generator=generator).to(DEVICE)
    k = torch.randn(batch, heads, seq_k, seq_k, generator=generator).to(DEVICE)
    v = torch.eye(seq_k, device=DEVICE).expand(batch, heads, seq_k, seq_k)
    torch.manual_seed(seed)
    return attention(q, k, v, dropout_p=p, backend="triton", scale=0.1) != 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_binomial_and_masks_differ(p):
    kept = _kept(seed=3, p=p)
    draws = kept.numel()
    # Kept count ~ Binomial(n, 1 - p): within 5 standard deviations (a false failure ~ 6e-7).
    sigma = math.sqrt(draws * p * (1 - p))
    assert abs(kept.sum().item() - draws * (1 - p)) <= 5 * sigma, (kept.sum().item(), draws * (1 - p))

    # Two independent masks agree on a fraction p^2 + (1 - p)^2 of elements; the same mask on 1.
    per_head = kept.flatten(0, 1)  # (B * H, Sq, Sk)
    cells = per_head[0].numel()
    agree_expected = p * p + (1 - p) ** 2
    bound = 5 * math.sqrt(agree_expected * (1 - agree_expected) / cells)
    other_seed = _kept(seed=4, p=p).flatten(0, 1)
    for a, b, what in [(0, 1, "heads"), (0, 3, "batches"), (2, 5, "batch and head")]:
        agree = (per_head[a] == per_head[b]).double().mean().item()
        assert abs(agree - agree_expected) <= bound, f"{what}: masks agree on {agree:.3f}"
    agree = (per_head == other_seed).double().mean().item()
    assert abs(agree - agree_expected) <= bound, f"seeds: masks agree on {agree:.3f}"
    # Rows and columns are not copies of each other either (the counter holds both).
    assert not torch.equal(per_head[0, 0], per_head[0, 1]) and not torch.equal(per_head[0, :, 0], per_head[0, :, 4])
