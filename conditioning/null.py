"""Null conditions for classifier-free guidance, and condition dropout for training.

Classifier-free guidance mixes the LM's logits under the real conditions with
its logits under "no condition". As in transformers' MusicGen, no text is a
zero embedding with a zero mask, and no melody is a chroma that is one-hot on
bin 0 in every frame. Training replaces a random subset of rows with these
null conditions so the same model learns both distributions. A melody model
also drops the melody alone from a share of the other rows (MusicGen-Melody's
attribute dropout, 0.5 of rows in audiocraft): without those text-only rows the
melody carries key and rhythm whenever text does, so the model never needs to
read key or tempo words, and a prompt without a melody is a condition it never
saw in training.
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_CAPTION = "none"  # what the text encoder reads for a row without a caption, whose states are then nulled


def null_text(emb: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The "no caption" condition: zero embeddings [B, L, D] and a zero mask [B, L]."""
    return torch.zeros_like(emb), torch.zeros_like(mask)


def null_chroma_features(features: Tensor) -> Tensor:
    """The "no melody" condition, same shape as `features` [B, T, C]: one-hot on bin 0."""
    null = torch.zeros_like(features)
    null[..., 0] = 1
    return null


def drop_conditions(
    emb: Tensor,
    mask: Tensor,
    features: Tensor | None,
    p: float,
    generator: torch.Generator | None = None,
    melody_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Replace each batch row, with probability `p`, by its null text and null melody (both together),
    and the melody alone of each other row with probability `melody_p`.

    emb [B, L, D], mask [B, L], features [B, T, C] or None -> the same shapes.
    """
    if not (0.0 <= p <= 1.0 and 0.0 <= melody_p <= 1.0):
        raise ValueError(f"dropout probabilities must be in [0, 1], got {p} and {melody_p}")
    if mask.shape != emb.shape[:2] or (features is not None and features.shape[0] != emb.shape[0]):
        raise ValueError(
            f"batch shapes disagree: emb {tuple(emb.shape)}, mask {tuple(mask.shape)}"
            + ("" if features is None else f", features {tuple(features.shape)}")
        )
    rand_device = generator.device if generator is not None else emb.device
    drop = torch.rand(emb.shape[0], generator=generator, device=rand_device) < p  # [B]
    drop = drop.to(emb.device)
    null_emb, null_mask = null_text(emb, mask)
    emb = torch.where(drop[:, None, None], null_emb, emb)
    mask = torch.where(drop[:, None], null_mask, mask)
    if features is not None:
        if melody_p > 0:  # drawn only when asked, so runs without it keep their random stream
            drop = drop | (torch.rand(emb.shape[0], generator=generator, device=rand_device) < melody_p).to(emb.device)
        features = torch.where(drop.to(features.device)[:, None, None], null_chroma_features(features), features)
    return emb, mask, features
