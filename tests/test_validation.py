"""Bad input gets a clear error naming the argument, what it got and what it expects."""

import pytest
import torch

from tformer import ops


def qkv(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=8, dtype=torch.float32):
    return (torch.randn(B, Hq, Sq, D, dtype=dtype), torch.randn(B, Hkv, Sk, D, dtype=dtype),
            torch.randn(B, Hkv, Sk, D, dtype=dtype))


def varlen(offsets_q, offsets_k, max_seqlen_q, max_seqlen_k):
    packed = torch.randn(5, 2, 8)
    return ops.attention_varlen(packed, packed, packed, torch.tensor(offsets_q, dtype=torch.int32),
                                torch.tensor(offsets_k, dtype=torch.int32), max_seqlen_q, max_seqlen_k)


@pytest.mark.parametrize("call, error, message", [
    (lambda: ops.attention(*qkv()[:2], "v"), TypeError, "argument 'v' must be a torch.Tensor, got str"),
    (lambda: ops.attention(torch.randn(5, 8), *qkv()[1:]), ValueError, r"argument 'q' must have 4 dimensions, got shape \(5, 8\)"),
    (lambda: ops.attention(*qkv(Hq=3)), ValueError, "q has 3 heads and k/v have 2"),
    (lambda: ops.attention(qkv()[0], qkv()[1], qkv()[2].half()), TypeError, "argument 'v' has dtype float16, expected float32"),
    (lambda: ops.attention(qkv()[0], qkv(D=4)[1], qkv()[2]), ValueError, r"argument 'k' must have shape \(B, Hkv, Sk, D\)"),
    (lambda: ops.attention(*qkv(), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError,
     r"argument 'key_padding_mask' must have shape \(B, Sk\) = \(2, 7\), got \(2, 6\)"),
    (lambda: ops.attention(*qkv(), key_padding_mask=torch.zeros(2, 7)), TypeError,
     "argument 'key_padding_mask' has dtype float32, expected one of bool"),
    (lambda: ops.attention(*qkv(), dropout_p=1.0), ValueError, r"argument 'dropout_p' must be a float in \[0, 1\), got 1.0"),
    (lambda: ops.attention(*qkv(), scale=float("nan")), ValueError, "argument 'scale' must be a finite float"),
    (lambda: ops.attention(*(t.long() for t in qkv())), TypeError, "argument 'q' has dtype int64"),
    (lambda: ops.layer_norm(torch.randn(3, 4), torch.ones(5)), ValueError,
     r"argument 'weight' must have shape \(N,\) with N = x.shape\[-1\] = \(4,\), got \(5,\)"),
    (lambda: ops.layer_norm(torch.randn(3, 4), eps=0), ValueError, "argument 'eps' must be a positive number, got 0"),
    (lambda: ops.layer_norm(torch.randn(3, 4), residual=torch.randn(3, 5)), ValueError, "argument 'residual' must have shape x.shape"),
    (lambda: ops.rms_norm(torch.tensor(1.0)), ValueError, "argument 'x' must have at least 1 dimension"),
    (lambda: ops.softmax(torch.randn(3, 4), dim=2), ValueError, r"argument 'dim' must be in \[-2, 1\]"),
    (lambda: ops.softmax(torch.randn(3, 4), mask=torch.ones(3, 5, dtype=torch.bool)), ValueError,
     r"argument 'mask' of shape \(3, 5\) does not broadcast to x's shape \(3, 4\)"),
    (lambda: ops.softmax(torch.randn(3, 4), mask=torch.ones(4, dtype=torch.int32)), TypeError, "argument 'mask' has dtype int32"),
    (lambda: ops.attention_varlen(torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8),
                                  torch.tensor([0, 5]), torch.tensor([0, 5], dtype=torch.int32), 5, 5),
     TypeError, "argument 'cu_seqlens_q' has dtype int64, expected one of int32"),
    (lambda: varlen([0, 2, 7], [0, 2, 5], 3, 3), ValueError,  # past the end of q (spare tokens after it are fine)
     r"argument 'cu_seqlens_q' must start at 0, never decrease and end at most at q.shape\[0\] = 5, got \[0, 2, 7\]"),
    (lambda: varlen([0, 2, 5], [1, 2, 5], 3, 3), ValueError, r"argument 'cu_seqlens_k' must start at 0"),
    (lambda: varlen([0, 3, 2], [0, 2, 5], 3, 3), ValueError, r"argument 'cu_seqlens_q' must start at 0"),
    (lambda: varlen([0, 2, 5], [0, 2, 5], 2, 3), ValueError,
     "argument 'max_seqlen_q' must be at least the longest sequence, 3, got 2"),
])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_softmax_along_another_dim_matches_last_dim():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.rand(5, 1) > 0.3
    moved = ops.softmax(x.transpose(1, 2), dim=-1, mask=mask.transpose(0, 1)).transpose(1, 2)
    torch.testing.assert_close(ops.softmax(x, dim=1, mask=mask), moved)
