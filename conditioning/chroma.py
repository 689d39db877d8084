"""Melody conditioning: a chromagram squeezed through an argmax bottleneck.

MusicGen-Melody conditions the LM on the dominant pitch class of each ~128 ms
frame of a reference melody. Keeping only the argmax (a one-hot per frame)
removes timbre and most harmony, so the model follows the tune without copying
the recording. The definition follows transformers'
`MusicgenMelodyFeatureExtractor`, written here in plain torch:

    wav [B, N] (truncated to 30 s, zero-padded to at least n_fft)
      -> |STFT|^2 / sum(window^2)      periodic Hann, centred, reflect padding
      -> chroma filter bank (librosa's, starting at C)
      -> max-normalised per frame -> one-hot argmax

The projected features are tiled/truncated to a fixed `chroma_length` and
prepended to the text embeddings: the prefix a melody LM reads before its codes
(MusicGen-Melody has no cross-attention).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.audio_utils import chroma_filter_bank

from codebooks.audio import read_audio, resample
from conditioning.null import null_chroma_features

MIN_PEAK = 1e-4  # below this the melody is treated as silence
MIN_SECONDS = 4096 / 32000  # one chroma hop at 32 kHz


class ChromaExtractor:
    """wav [B, N] -> max-normalised chroma [B, frames, num_chroma], frames = 1 + max(N, n_fft) // hop_length."""

    def __init__(
        self,
        sample_rate: int = 32000,
        n_fft: int = 16384,
        hop_length: int = 4096,
        num_chroma: int = 12,
        chunk_length: float = 30.0,
    ):
        if n_fft <= 0 or hop_length <= 0 or num_chroma <= 0 or sample_rate <= 0:
            raise ValueError("sample_rate, n_fft, hop_length and num_chroma must be positive")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.num_chroma = num_chroma
        self.max_samples = int(chunk_length * sample_rate)  # longer input is cut, as transformers does
        filters = chroma_filter_bank(
            num_frequency_bins=n_fft, num_chroma=num_chroma, sampling_rate=sample_rate, tuning=0
        )
        self.filters = torch.from_numpy(filters).float()  # [num_chroma, n_fft // 2 + 1]
        self.window = torch.hann_window(n_fft, periodic=True)  # [n_fft]

    def spectrogram(self, wav: Tensor) -> Tensor:
        """Power spectrogram normalised by the window energy: [B, N] -> [B, n_fft // 2 + 1, frames]."""
        window = self.window.to(wav.device)
        spec = torch.stft(
            wav,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            window=window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )  # [B, F, frames]
        spec = spec / window.pow(2.0).sum().sqrt()
        return spec.abs().pow(2.0)

    def __call__(self, wav: Tensor) -> Tensor:
        if wav.dim() != 2:
            raise ValueError(f"expected a waveform batch [B, N], got shape {tuple(wav.shape)}")
        wav = wav.float()[:, : self.max_samples]  # [B, N]
        length = wav.shape[-1]
        if length < self.n_fft:
            # centre short waveforms in n_fft samples of silence (extra sample goes to the right)
            pad = self.n_fft - length
            wav = F.pad(wav, (pad // 2, pad - pad // 2))
        spec = self.spectrogram(wav)  # [B, F, T]
        chroma = torch.einsum("cf,bft->bct", self.filters.to(wav.device), spec)  # [B, C, T]
        chroma = F.normalize(chroma, p=float("inf"), dim=-2, eps=1e-6)
        return chroma.transpose(1, 2)  # [B, T, C]


def argmax_bottleneck(chroma: Tensor) -> Tensor:
    """One-hot of the per-frame argmax: [B, T, C] -> [B, T, C] float (ties go to the lowest bin)."""
    index = chroma.argmax(dim=-1)  # [B, T]
    return F.one_hot(index, chroma.shape[-1]).float()


def _to_mono(wav: Tensor) -> Tensor:
    if wav.dim() == 1:
        return wav
    if wav.dim() == 2:
        if wav.shape[0] > wav.shape[1]:
            shape = tuple(wav.shape)
            raise ValueError(f"melody of shape {shape} looks like [samples, channels]; pass [channels, samples]")
        return wav.mean(dim=0)
    raise ValueError(f"melody must be [samples] or [channels, samples], got shape {tuple(wav.shape)}")


def load_melody(
    melody: str | Path | np.ndarray | Tensor, sample_rate: int | None = None, target_sample_rate: int = 32000
) -> Tensor:
    """A reference melody as mono float32 [N] at `target_sample_rate`.

    `melody` is an audio file path (read with soundfile; `sample_rate` may be
    omitted) or an array/tensor [N] or [C, N] (then `sample_rate` is required).
    """
    if isinstance(melody, (str, Path)):
        path = Path(melody)
        if not path.is_file():
            raise FileNotFoundError(f"melody file not found: {path}")
        try:
            data, file_rate = read_audio(path)  # [C, N]
        except sf.SoundFileError as error:
            raise ValueError(f"{path} is not an audio file soundfile can read ({error})") from None
        if sample_rate is not None and sample_rate != file_rate:
            raise ValueError(f"sample_rate={sample_rate} but {path} is sampled at {file_rate} Hz")
        wav = torch.from_numpy(data)  # [C, N]
        sample_rate = file_rate
    elif isinstance(melody, (np.ndarray, Tensor)):
        if sample_rate is None:
            raise ValueError("sample_rate is required when the melody is an array")
        wav = torch.as_tensor(melody)
        if not wav.is_floating_point():
            raise ValueError(f"melody samples must be floating point in [-1, 1], got dtype {wav.dtype}")
    else:
        raise ValueError(f"melody must be a path, numpy array or torch tensor, got {type(melody).__name__}")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    wav = _to_mono(wav.detach().cpu().float())  # [N]
    if not torch.isfinite(wav).all():
        raise ValueError("melody contains NaN or infinite samples")
    wav = resample(wav, sample_rate, target_sample_rate)
    min_samples = math.ceil(MIN_SECONDS * target_sample_rate)
    if wav.shape[-1] < min_samples:
        raise ValueError(
            f"melody is {wav.shape[-1] / target_sample_rate:.3f} s long; at least {MIN_SECONDS:.3f} s "
            f"(one 4096-sample chroma hop at 32 kHz) is needed"
        )
    if wav.abs().max() < MIN_PEAK:
        raise ValueError(f"melody is silent (peak amplitude below {MIN_PEAK})")
    return wav.contiguous()


class ChromaConditioner(nn.Module):
    """Melody waveforms -> one-hot chroma features -> projected, tiled [B, chroma_length, dim]."""

    def __init__(
        self,
        dim: int,
        chroma_length: int,
        num_chroma: int = 12,
        sample_rate: int = 32000,
        n_fft: int = 16384,
        hop_length: int = 4096,
    ):
        super().__init__()
        if dim <= 0 or chroma_length <= 0:
            raise ValueError(f"dim and chroma_length must be positive, got {dim} and {chroma_length}")
        self.dim = dim
        self.chroma_length = chroma_length
        self.num_chroma = num_chroma
        self.extractor = ChromaExtractor(sample_rate, n_fft, hop_length, num_chroma)
        # transformers' `audio_enc_to_dec_proj` exists only when the widths differ.
        self.proj = nn.Linear(num_chroma, dim) if num_chroma != dim else nn.Identity()

    def features(self, wavs: list[Tensor]) -> Tensor:
        """Mono waveforms [N_i] -> bottlenecked chroma [B, frames, num_chroma] (zero-padded to the longest)."""
        if len(wavs) == 0:
            raise ValueError("wavs must be a non-empty list of waveforms")
        for i, wav in enumerate(wavs):
            if not isinstance(wav, Tensor) or wav.dim() != 1:
                raise ValueError(f"wavs[{i}] must be a 1-D tensor of samples")
        length = max(wav.shape[0] for wav in wavs)
        batch = torch.stack([F.pad(wav.float(), (0, length - wav.shape[0])) for wav in wavs])  # [B, N]
        return argmax_bottleneck(self.extractor(batch))

    def null_features(self, batch: int, frames: int = 1, device: torch.device | str | None = None) -> Tensor:
        """The "no melody" condition: every frame one-hot on bin 0, [batch, frames, num_chroma].

        Created on `device`, by default the projection's device (CPU when the projection is the identity).
        """
        if device is None:
            device = next(self.parameters(), torch.empty(0)).device
        return null_chroma_features(torch.zeros(batch, frames, self.num_chroma, device=device))

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 3 or features.shape[1] == 0 or features.shape[-1] != self.num_chroma:
            raise ValueError(f"expected chroma features [B, T, {self.num_chroma}], got shape {tuple(features.shape)}")
        hidden = self.proj(features)  # [B, T, dim]
        frames = hidden.shape[1]
        if frames < self.chroma_length:
            hidden = hidden.repeat(1, math.ceil(self.chroma_length / frames), 1)
        return hidden[:, : self.chroma_length]  # [B, chroma_length, dim]
