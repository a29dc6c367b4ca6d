"""Speech front end: log-mel features (``torch.stft`` + librosa's mel filter bank), SpecAugment
masking, and ``SpeechEmbedding``, a convolutional stem that subsamples time by 4."""

from __future__ import annotations

import torch
from torch import nn

from tformer.optional import require


class LogMel(nn.Module):
    """Waveform ``(B, N)`` -> log-mel features ``(B, T, n_mels)``, ``T = N // hop_length + 1``.

    Power spectrogram from ``torch.stft`` (Hann window, centered frames, zero padding, as
    ``librosa.feature.melspectrogram``), projected by ``librosa.filters.mel`` (Slaney
    normalization, stored as a non-persistent buffer), then ``log(mel + 1e-6)``. Runs on the
    waveform's device, so on the GPU when the model is there.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 80):
        super().__init__()
        librosa = require("librosa", "LogMel")
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        filters = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("filters", torch.from_numpy(filters).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Frames ``T`` for waveforms of ``num_samples`` (centered STFT)."""
        return num_samples // self.hop_length + 1

    def power_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` -> mel power ``(B, n_mels, T)`` in float32 (before the log)."""
        if waveform.dim() != 2:
            raise ValueError(f"LogMel: argument 'waveform' must be (B, N), got shape {tuple(waveform.shape)}")
        spectrum = torch.stft(waveform.float(), self.n_fft, hop_length=self.hop_length, window=self.window,
                              center=True, pad_mode="constant", return_complex=True)
        return self.filters @ spectrum.abs().pow(2)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.power_mel(waveform) + 1e-6).transpose(1, 2)


def spec_augment(features: torch.Tensor, *, freq_masks: int, freq_width: int, time_masks: int,
                 time_width_fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment's masking (Park et al., 2019, without time warping): ``freq_masks`` bands of up
    to ``freq_width`` mel channels and ``time_masks`` spans of up to ``time_width_fraction`` of the
    frames are set to the utterance mean. features ``(B, T, F)``; returns a new tensor."""
    batch, frames, channels = features.shape
    out = features.clone()
    mean = features.mean(dim=(1, 2), keepdim=True)
    device = features.device

    def spans(count: int, max_width: int, size: int) -> torch.Tensor:
        """``(B, size)`` bool, True inside one of ``count`` random spans per row."""
        width = (torch.rand(batch, count, generator=generator) * (max_width + 1)).long()
        start = (torch.rand(batch, count, generator=generator) * (size - width + 1).clamp(min=1)).long()
        index = torch.arange(size)[None, None, :]
        return ((index >= start[..., None]) & (index < (start + width)[..., None])).any(dim=1).to(device)

    if freq_masks > 0 and freq_width > 0:
        out = torch.where(spans(freq_masks, freq_width, channels)[:, None, :], mean, out)
    time_width = int(time_width_fraction * frames)
    if time_masks > 0 and time_width > 0:
        out = torch.where(spans(time_masks, time_width, frames)[:, :, None], mean, out)
    return out


class SpeechEmbedding(nn.Module):
    """Waveforms to encoder inputs: log-mel, per-utterance normalization, SpecAugment (training
    only), then two 3x3 stride-2 convolutions with GELU (x4 fewer frames, as the Conformer /
    ESPnet "Conv2dSubsampling") and a linear map to ``d_model``.

    ``forward(waveform (B, N), num_samples (B,))`` returns ``(embeddings (B, T', d_model),
    padding_mask (B, T') bool, True = padding frame)``.
    """

    def __init__(self, d_model: int, *, sample_rate: int = 16000, n_mels: int = 80, channels: int = 64,
                 spec_augment: bool = True, freq_masks: int = 2, freq_width: int = 10, time_masks: int = 2,
                 time_width_fraction: float = 0.05):
        super().__init__()
        self.log_mel = LogMel(sample_rate=sample_rate, n_mels=n_mels)
        self.spec_augment = spec_augment
        self.mask_options = dict(freq_masks=freq_masks, freq_width=freq_width, time_masks=time_masks,
                                 time_width_fraction=time_width_fraction)
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.activation = nn.GELU()
        reduced_mels = (n_mels + 3) // 4
        self.out = nn.Linear(channels * reduced_mels, d_model)

    @staticmethod
    def subsampled_length(frames: torch.Tensor) -> torch.Tensor:
        """Frames after the two stride-2 convolutions (kernel 3, padding 1): ceil twice."""
        return (frames + 3) // 4

    def forward(self, waveform: torch.Tensor, num_samples: torch.Tensor):
        # Zero the samples past each length, so what pads a row never leaks into its last frames.
        inside = torch.arange(waveform.shape[1], device=waveform.device)[None, :] < num_samples[:, None]
        features = self.log_mel(waveform * inside)  # (B, T, F)
        frames = self.log_mel.num_frames(num_samples)
        valid = torch.arange(features.shape[1], device=features.device)[None, :] < frames[:, None]
        # Normalize each utterance over its real frames, so loudness and padding do not matter.
        weight = valid[..., None].float()
        count = weight.sum(dim=(1, 2), keepdim=True).clamp(min=1) * 1.0
        mean = (features * weight).sum(dim=(1, 2), keepdim=True) / (count * features.shape[2])
        var = ((features - mean) ** 2 * weight).sum(dim=(1, 2), keepdim=True) / (count * features.shape[2])
        features = ((features - mean) / (var + 1e-5).sqrt()) * weight
        if self.training and self.spec_augment:
            features = spec_augment(features, **self.mask_options) * weight
        # Padding frames are zeroed after each convolution (the bias would make them nonzero), so a
        # row's output does not depend on how much padding its batch added.
        hidden = self.activation(self.conv1(features.unsqueeze(1)))  # (B, C, ceil(T / 2), F / 2)
        half = (frames + 1) // 2
        inside_half = torch.arange(hidden.shape[2], device=hidden.device)[None, :] < half[:, None]
        hidden = hidden * inside_half[:, None, :, None]
        hidden = self.activation(self.conv2(hidden))  # (B, C, T', F')
        batch, channels, length, reduced = hidden.shape
        hidden = self.out(hidden.permute(0, 2, 1, 3).reshape(batch, length, channels * reduced))
        sub_frames = self.subsampled_length(frames)
        padding_mask = torch.arange(length, device=hidden.device)[None, :] >= sub_frames[:, None]
        return hidden, padding_mask
