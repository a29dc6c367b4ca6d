"""The device's ceilings, measured once per session, so every row can say how close to the
physical limit it gets: copy bandwidth (bytes read + written) and dense matmul throughput."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bench.timing import median_seconds

# GPU: the figures ANCHORS.md calls the ceilings (1 GiB device-to-device copy, bf16 8192^3).
# CPU: smaller sizes so the session stays fast; float32, the dtype the CPU rows run in.
GPU_COPY_BYTES, GPU_MATMUL_N, GPU_MATMUL_DTYPE = 1 << 30, 8192, torch.bfloat16
CPU_COPY_BYTES, CPU_MATMUL_N, CPU_MATMUL_DTYPE = 64 << 20, 1024, torch.float32


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float  # GB/s, bytes read + written, 1 GB = 1e9 bytes
    matmul_tflops: float
    copy_bytes: int
    matmul_n: int
    matmul_dtype: str

    def as_extra_info(self) -> dict:
        return {f"ceiling_{key}": value for key, value in asdict(self).items()}


def measure_ceilings(device: torch.device) -> Ceilings:
    on_gpu = device.type == "cuda"
    copy_bytes = GPU_COPY_BYTES if on_gpu else CPU_COPY_BYTES
    n = GPU_MATMUL_N if on_gpu else CPU_MATMUL_N
    dtype = GPU_MATMUL_DTYPE if on_gpu else CPU_MATMUL_DTYPE
    repeats = 20 if on_gpu else 5

    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    destination = torch.empty_like(source)
    copy_seconds = median_seconds(lambda: destination.copy_(source), device, repeats, warmup=3)
    del source, destination

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_seconds = median_seconds(lambda: a @ b, device, repeats, warmup=3)
    return Ceilings(copy_gbps=2 * copy_bytes / copy_seconds / 1e9, matmul_tflops=2 * n ** 3 / matmul_seconds / 1e12,
                    copy_bytes=copy_bytes, matmul_n=n, matmul_dtype=str(dtype).removeprefix("torch."))
