"""What the codec trainer minimises: multi-scale log-mel distance and EnCodec's multi-scale STFT discriminator losses."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.audio_utils import mel_filter_bank

MEL_FFT_SIZES = (256, 512, 1024, 2048)
DISC_FFT_SIZES = (2048, 1024, 512)


class MultiScaleMelLoss(nn.Module):
    """Mean over STFT sizes of the L1 distance between log-mel magnitude spectrograms."""

    def __init__(self, sample_rate: int, fft_sizes: tuple[int, ...] = MEL_FFT_SIZES, n_mels: int = 64) -> None:
        super().__init__()
        self.fft_sizes = fft_sizes
        for n_fft in fft_sizes:
            with warnings.catch_warnings():  # transformers warns about the all-zero bands dropped below
                warnings.simplefilter("ignore")
                bank = mel_filter_bank(n_fft // 2 + 1, n_mels, 0.0, sample_rate / 2, sample_rate)
            bank = torch.from_numpy(bank).float()  # [F, n_mels]
            # At small FFT sizes the lowest bands are narrower than one bin and catch nothing.
            self.register_buffer(f"bank_{n_fft}", bank[:, bank.sum(0) > 0], persistent=False)
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def log_mel(self, wav: Tensor, n_fft: int) -> Tensor:
        """wav [B, 1, N] -> log-mel [B, M, frames]."""
        spec = torch.stft(
            wav.flatten(0, 1), n_fft, hop_length=n_fft // 4, window=getattr(self, f"window_{n_fft}"),
            return_complex=True,
        ).abs()  # [B, F, frames]
        mel = getattr(self, f"bank_{n_fft}").t() @ spec
        return mel.clamp(min=1e-5).log()

    def forward(self, estimate: Tensor, reference: Tensor) -> Tensor:
        losses = [F.l1_loss(self.log_mel(estimate, n), self.log_mel(reference, n)) for n in self.fft_sizes]
        return torch.stack(losses).mean()


class STFTDiscriminator(nn.Module):
    """2-D convolutions over the complex STFT (real and imaginary parts as two channels) at one resolution."""

    def __init__(self, n_fft: int, channels: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        norm = nn.utils.parametrizations.weight_norm
        self.convs = nn.ModuleList(
            [norm(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
            + [  # strided along frequency, dilated along time
                norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4)))
                for d in (1, 2, 4)
            ]
            + [norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)))]
        )
        self.head = norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, wav: Tensor) -> tuple[Tensor, list[Tensor]]:
        """wav [B, 1, N] -> logits [B, 1, frames, F'] and the feature map of every layer."""
        spec = torch.stft(
            wav.flatten(0, 1), self.n_fft, hop_length=self.n_fft // 4, window=self.window,
            normalized=True, center=False, return_complex=True,
        )  # fmt: skip  # [B, F, frames]
        h = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2, frames, F]
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            features.append(h)
        return self.head(h), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, channels: int = 32, fft_sizes: tuple[int, ...] = DISC_FFT_SIZES) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(n, channels) for n in fft_sizes)

    def forward(self, wav: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(wav) for d in self.discriminators]


def generator_adversarial_losses(
    fake: list[tuple[Tensor, list[Tensor]]], real: list[tuple[Tensor, list[Tensor]]]
) -> tuple[Tensor, Tensor]:
    """Hinge loss of the codec, and feature matching (L1 relative to the real features' mean magnitude)."""
    adv = torch.stack([F.relu(1 - logits).mean() for logits, _ in fake]).mean()
    feat = torch.stack(
        [
            (f - r).abs().mean() / (r.abs().mean() + 1e-8)
            for (_, fake_feats), (_, real_feats) in zip(fake, real)
            for f, r in zip(fake_feats, real_feats)
        ]
    ).mean()
    return adv, feat


def discriminator_loss(fake: list[tuple[Tensor, list[Tensor]]], real: list[tuple[Tensor, list[Tensor]]]) -> Tensor:
    """Hinge loss of the discriminator: real logits pushed above 1, fake ones below -1."""
    return torch.stack(
        [F.relu(1 - r).mean() + F.relu(1 + f).mean() for (f, _), (r, _) in zip(fake, real)]
    ).mean()

