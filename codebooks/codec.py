"""EnCodec as a tokenizer: waveform <-> residual-VQ codes [B, K, T].

The LM never sees audio, only the integer codes of a neural codec. EnCodec's encoder
turns every `hop_length` samples into one latent frame, and a residual vector
quantizer writes that frame as K codebook indices, each refining what the previous
ones missed:

    wav [B, C, N] --encoder--> latents [B, D, T] --RVQ--> codes [B, K, T], T = ceil(N / hop)
    codes [B, K, T] --sum of K codebook vectors--> latents --decoder--> wav [B, C, T * hop]

MusicGen's codec runs at 32 kHz mono with hop 640 (50 frames/s) and keeps K = 4
codebooks of 2048 entries. transformers' EncodecModel picks K from a bandwidth:
K = floor(bandwidth / (frame_rate * log2(codebook_size))), so 2.2 kbps at 50 Hz with
11-bit codebooks gives 4. Because quantization is residual, the first K codes do not
depend on later codebooks, so any K up to what the largest bandwidth allows is served
by encoding at the smallest bandwidth that gives at least K and keeping the first K.

Codecs with `normalize=True` divide the input by its RMS before encoding; the scale is
not part of the tokens (an LM cannot predict it), so decoded audio comes back at that
normalized loudness. Codecs with `chunk_length_s` encode overlapping chunks whose codes
do not form one frame sequence, so they are rejected.

A codec whose config carries `rvq_beam_width` > 1 (one trained with it, `train.py codec
--beam-width`) chooses its codes by beam search (`codebooks.rvq.beam_search_codes`) rather than
transformers' greedy stage-by-stage choice; the decoder and the codes' meaning are the same.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import EncodecConfig, EncodecModel

from codebooks.audio import resample
from codebooks.rvq import beam_search_codes


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def rvq_beam_width(config: EncodecConfig) -> int:
    """The beam width a codec's codes are searched with: its config's `rvq_beam_width`, else 1 (greedy)."""
    width = getattr(config, "rvq_beam_width", 1)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"rvq_beam_width must be a positive int, got {width!r}")
    return width


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class EncodecCodec(torch.nn.Module):
    """Waveform <-> codes with a transformers EncodecModel, keeping `num_codebooks` codebooks."""

    def __init__(self, model: EncodecModel, num_codebooks: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, EncodecModel):
            raise ValueError(f"model must be a transformers EncodecModel, got {type(model).__name__}")
        config = model.config
        if config.chunk_length_s is not None:
            raise ValueError(
                f"chunked EnCodec configs (chunk_length_s={config.chunk_length_s}) are not supported: "
                "their codes cover overlapping chunks, not one frame sequence"
            )
        self.model = model
        available = len(model.quantizer.layers)
        # bandwidth (kbps) -> number of codebooks EncodecModel.encode emits for it
        per_bandwidth = {
            bw: min(available, model.quantizer.get_num_quantizers_for_bandwidth(bw)) for bw in config.target_bandwidths
        }
        if num_codebooks is None:
            num_codebooks = per_bandwidth[min(per_bandwidth)]
        if not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        enough = [bw for bw, n in per_bandwidth.items() if n >= num_codebooks]
        if not enough:
            raise ValueError(
                f"num_codebooks={num_codebooks} exceeds the {max(per_bandwidth.values())} codebooks "
                f"this codec's target_bandwidths {list(config.target_bandwidths)} allow"
            )
        self._bandwidth = min(enough)
        self._num_codebooks = num_codebooks
        self.beam_width = rvq_beam_width(config)

    @classmethod
    def from_config(cls, config: EncodecConfig, num_codebooks: int | None = None) -> EncodecCodec:
        """Freshly initialised codec (transformers initialises codebook vectors to zero)."""
        return cls(EncodecModel(config).eval(), num_codebooks)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_codebooks: int | None = None) -> EncodecCodec:
        """Load a codec saved in transformers format (config.json + weights) from a local folder."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no EnCodec checkpoint at {path} (missing config.json)")
        return cls(EncodecModel.from_pretrained(str(path), local_files_only=True).eval(), num_codebooks)

    def save_pretrained(self, path: str | Path) -> None:
        """Save the underlying EncodecModel in transformers format."""
        self.model.save_pretrained(Path(path))

    @property
    def sample_rate(self) -> int:
        return self.model.config.sampling_rate

    @property
    def channels(self) -> int:
        return self.model.config.audio_channels

    @property
    def hop_length(self) -> int:
        return math.prod(self.model.config.upsampling_ratios)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.model.config.codebook_size

    def _prepare(self, wav: torch.Tensor, sample_rate: int | None) -> torch.Tensor:
        """[B, C, N] | [B, N] | [N] at any rate -> [B, channels, N'] at the codec rate."""
        if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
            raise ValueError("wav must be a floating-point torch.Tensor")
        if wav.ndim not in (1, 2, 3):
            raise ValueError(f"wav must be [B, C, N], [B, N] or [N], got shape {tuple(wav.shape)}")
        if wav.numel() == 0:
            raise ValueError(f"wav is empty (shape {tuple(wav.shape)})")
        if not torch.isfinite(wav).all():
            raise ValueError("wav contains NaN or infinite values")
        sample_rate = self.sample_rate if sample_rate is None else sample_rate
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        if wav.ndim == 1:
            wav = wav[None, None]
        elif wav.ndim == 2:
            wav = wav[:, None]  # [B, C, N]
        param = next(self.model.parameters())
        wav = wav.to(device=param.device, dtype=param.dtype)
        channels = wav.shape[1]
        if channels != self.channels:
            if self.channels == 1:
                wav = wav.mean(dim=1, keepdim=True)
            elif channels == 1:
                wav = wav.expand(-1, self.channels, -1)
            else:
                raise ValueError(f"cannot map {channels}-channel audio to a {self.channels}-channel codec")
        wav = resample(wav, sample_rate, self.sample_rate)
        if wav.shape[-1] == 0:
            raise ValueError(f"audio is too short to resample from {sample_rate} Hz to {self.sample_rate} Hz")
        return wav

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Audio [B, C, N] | [B, N] | [N] at `sample_rate` (default: codec rate) -> codes [B, K, T].

        T = ceil(N' / hop_length), N' the length at the codec rate.
        """
        wav = self._prepare(wav, sample_rate)  # [B, channels, N']
        with _eval_mode(self.model):
            if self.beam_width == 1:
                encoded = self.model.encode(wav, bandwidth=self._bandwidth, return_dict=True)
                return encoded.audio_codes[0, :, : self.num_codebooks]  # [1, B, K', T] -> [B, K, T]
            if self.model.config.normalize:  # as EncodecModel._encode_frame: the mono RMS, kept out of the codes
                wav = wav / (wav.mean(1, keepdim=True).pow(2).mean(-1, keepdim=True).sqrt() + 1e-8)
            latents = self.model.encoder(wav)  # [B, D, T]
        B, D, T = latents.shape
        embeds = [layer.codebook.embed for layer in self.model.quantizer.layers[: self.num_codebooks]]
        codes = beam_search_codes(latents.transpose(1, 2).reshape(-1, D), embeds, self.beam_width)  # [B*T, K]
        return codes.view(B, T, -1).transpose(1, 2)  # [B, K, T]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, T] -> audio [B, channels, T * hop_length] at the codec rate."""
        if not isinstance(codes, torch.Tensor) or codes.dtype not in _INTEGER_DTYPES:
            raise ValueError("codes must be an integer torch.Tensor")
        if codes.ndim != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [B, {self.num_codebooks}, T], got shape {tuple(codes.shape)}")
        if codes.numel() == 0:
            raise ValueError(f"codes are empty (shape {tuple(codes.shape)})")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got range [{codes.min().item()}, {codes.max().item()}]"
            )
        device = next(self.model.parameters()).device
        with _eval_mode(self.model):
            decoded = self.model.decode(codes.long().to(device)[None], [None], return_dict=True)
        wav = decoded.audio_values  # [B, channels, ~T * hop]
        length = codes.shape[-1] * self.hop_length
        if wav.shape[-1] < length:
            return torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))
        return wav[..., :length]
