"""A small forward + backward of every CUDA kernel, for compute-sanitizer (memcheck, racecheck):
attention at head dim 64 with causal + padding + GQA, a packed batch whose last sequence is
empty, and the row kernels at an odd width. Run by `bash bench/gpu_session.sh sanitize`."""

import torch

import tformer

torch.manual_seed(0)
device, dtype = "cuda", torch.bfloat16


def leaf(*shape):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


q, k, v = leaf(2, 4, 77, 64), leaf(2, 2, 91, 64), leaf(2, 2, 91, 64)
pad = torch.arange(91, device=device)[None] >= torch.tensor([[91], [40]], device=device)
out = tformer.ops.attention(q, k, v, causal=True, key_padding_mask=pad, backend="cuda")
out.float().square().sum().backward()

cu = torch.tensor([0, 33, 70, 70], device=device, dtype=torch.int32)  # the last sequence is empty
q, k, v = leaf(70, 4, 64), leaf(70, 2, 64), leaf(70, 2, 64)
out = tformer.ops.attention_varlen(q, k, v, cu, cu, 37, 37, causal=True, backend="cuda")
out.float().square().sum().backward()

x, weight, bias = leaf(33, 1001), leaf(1001), leaf(1001)
tformer.ops.layer_norm(x, weight, bias, backend="cuda").float().square().sum().backward()
keep = torch.rand(33, 1001, device=device) > 0.5
tformer.ops.softmax(x, mask=keep, backend="cuda").float().square().sum().backward()
torch.cuda.synchronize()
print("sanitize: all CUDA kernels ran")
