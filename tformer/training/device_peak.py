"""Peak dense bf16 tensor-core FLOP/s of a device, looked up by its name, for MFU.

MFU (model FLOPs utilization, PaLM appendix B) divides the achieved training FLOP/s by the
device's peak. The peaks below are NVIDIA's datasheet figures for dense bf16 matmuls with fp32
accumulation (datasheets quote "with sparsity" figures, twice these):

- H100 SXM 989 TFLOP/s, H100 NVL 835, H100 PCIe 756: NVIDIA H100 Tensor Core GPU datasheet
  (https://www.nvidia.com/en-us/data-center/h100/).
- H200 SXM 989, H200 NVL 835: NVIDIA H200 datasheet (https://www.nvidia.com/en-us/data-center/h200/).
- A100 (SXM and PCIe, 40 and 80 GB) 312: NVIDIA A100 datasheet (https://www.nvidia.com/en-us/data-center/a100/).
- A10 125, L4 121, L40S 362: their NVIDIA datasheets (https://www.nvidia.com/en-us/data-center/products/a10-gpu/,
  .../l4/, .../l40s/).
- GeForce RTX 4090 165.2 (fp32 accumulate): NVIDIA Ada Lovelace architecture whitepaper, table 2;
  RTX 3090 71: NVIDIA Ampere GA102 whitepaper, table 9.

A device not listed (a CPU, another GPU) has no known peak: :func:`peak_bf16_flops` returns None
and MFU is reported as unknown, never against a guessed constant.
"""

from __future__ import annotations

import re

import torch

# (pattern on the lower-cased device name, peak FLOP/s); the first match wins, so a specific
# variant (H100 PCIe) comes before its family (H100, whose plain name is the SXM part).
PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    (r"h100.*pcie", 756e12),
    (r"h100.*nvl", 835e12),
    (r"h100", 989e12),  # "NVIDIA H100 80GB HBM3": SXM
    (r"h200.*nvl", 835e12),
    (r"h200", 989e12),
    (r"a100", 312e12),
    (r"l40s", 362e12),
    (r"\bl4\b", 121e12),
    (r"\ba10\b", 125e12),
    (r"rtx 4090", 165.2e12),
    (r"rtx 3090", 71e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the device called ``device_name`` (``torch.cuda.get_device_name``),
    or None when it is not in the table."""
    name = device_name.lower()
    for pattern, peak in PEAK_BF16_DENSE:
        if re.search(pattern, name):
            return peak
    return None


def device_peak_flops(device: torch.device | str) -> float | None:
    """:func:`peak_bf16_flops` of a torch device; None for a CPU or an unlisted GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def mfu(achieved_flops_per_s: float, peak_flops: float | None) -> float | None:
    """``achieved / peak``, or None (unknown) when the peak is unknown."""
    return None if peak_flops is None else achieved_flops_per_s / peak_flops
