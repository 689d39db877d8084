"""The trainable codec: transformers' EnCodec encoder and decoder around our residual VQ with EMA codebooks.

    wav [B, 1, N] --encoder--> latents [B, D, T] --RVQ--> codes [B, K, T], quantized [B, D, T]
    quantized [B, D, T] --decoder--> recon [B, 1, T * hop],   T = N / hop (N a multiple of hop)

`to_encodec` turns it into a plain transformers `EncodecModel` (what `EncodecCodec` loads), and
`load_encodec` takes one's weights back, to fine-tune a trained codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import EncodecConfig, EncodecModel

from codebooks.codec import rvq_beam_width
from codebooks.rvq import ResidualVQ


@dataclass
class CodecOutput:
    recon: Tensor  # [B, 1, N]
    codes: Tensor  # [B, K, T]
    commit_loss: Tensor  # scalar


class Codec(nn.Module):
    """transformers' EnCodec encoder and decoder around a trainable ResidualVQ."""

    def __init__(self, config: EncodecConfig, decay: float = 0.99, dead_threshold: float = 0.1) -> None:
        super().__init__()
        self.config = config
        base = EncodecModel(config)  # for transformers' weight initialisation of encoder and decoder
        self.encoder = base.encoder
        self.decoder = base.decoder
        num_codebooks = len(base.quantizer.layers)
        self.quantizer = ResidualVQ(config.codebook_dim, num_codebooks, config.codebook_size, decay, dead_threshold,
                                    beam_width=rvq_beam_width(config))

    def forward(self, wav: Tensor, quantize: bool = True) -> CodecOutput:
        """wav [B, 1, N] -> recon [B, 1, N]; with quantize=False the decoder sees the unquantized latents."""
        latents = self.encoder(wav)  # [B, D, T], T = ceil(N / hop)
        rvq = self.quantizer(latents)
        recon = self.decoder(rvq.quantized if quantize else latents)  # [B, 1, T * hop]
        return CodecOutput(recon[..., : wav.shape[-1]], rvq.codes, rvq.commit_loss)

    def load_encodec(self, model: EncodecModel) -> None:
        """Take the weights, codebooks and codebook EMA state of a transformers EncodecModel of this config."""
        self.encoder.load_state_dict(model.encoder.state_dict())
        self.decoder.load_state_dict(model.decoder.state_dict())
        self.quantizer.import_from(model.quantizer)

    def to_encodec(self) -> EncodecModel:
        """A CPU transformers EncodecModel with these weights and codebooks."""
        with torch.random.fork_rng(devices=[]):  # its throwaway random init must not shift a run's random stream
            model = EncodecModel(self.config)
        model.encoder.load_state_dict(self.encoder.state_dict())
        model.decoder.load_state_dict(self.decoder.state_dict())
        self.quantizer.export_to(model.quantizer)
        return model.eval()

