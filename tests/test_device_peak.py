"""MFU's denominator: the device's dense bf16 peak, looked up by name, or unknown."""

import pytest
import torch

from tformer.models import DecoderLM, ModelConfig
from tformer.training.device_peak import device_peak_flops, mfu, peak_bf16_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
])
def test_known_devices_have_their_datasheet_peak(name, peak):
    assert peak_bf16_flops(name) == peak


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-16GB", "NVIDIA A10G", "NVIDIA GeForce GTX 1080", ""])
def test_unknown_devices_have_no_peak(name):
    assert peak_bf16_flops(name) is None


def test_cpu_peak_and_mfu_are_unknown():
    assert device_peak_flops(torch.device("cpu")) is None
    assert mfu(1e12, None) is None
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)


def test_the_model_takes_the_peak_from_the_caller():
    model = DecoderLM(ModelConfig(vocab_size=16, max_seq_len=8, d_model=16, n_layers=1, n_heads=2))
    assert model.estimate_mfu(1000.0, 8, peak_flops=None) is None
    with pytest.raises(TypeError):
        model.estimate_mfu(1000.0, 8)  # no default peak hidden in the model
