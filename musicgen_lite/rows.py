"""Rows of a batch computed apart: prefix rows packed at their own positions, and attention that no padding changes.

A batch pads its rows to a common length. For a row's output not to depend on the rest of its batch
(`LMConditions.independent_rows`), a prefix row is packed (its real prefix entries, then its tokens,
then the padding), and attention over padded keys pads them further to a fixed block, so that the
reductions group a row's keys the same way whatever the batch's longest row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KEY_BLOCK = 64  # keys are padded to a multiple of this in row_invariant_attention


def padded_keys(length: int) -> int:
    """`length` keys rounded up to a whole number of KEY_BLOCKs: a cache that holds zeros in its unwritten
    slots can hand row_invariant_attention this many keys (bias masking the extra ones) and spare the copy."""
    return length + (-length % KEY_BLOCK)


def row_invariant_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v ([N, H, T, hd] queries, [N, H, S, hd] keys and values, an additive
    [N or 1, 1, T or 1, S] bias that holds the dtype's lowest value at masked keys), computed so that a
    row's result does not depend on how many masked keys trail its own: the keys are padded to a multiple
    of KEY_BLOCK, so that vectorised reductions group a row's keys the same way whatever the padding
    (fused attention kernels do not)."""
    k, v, bias = padded_to_blocks(k, v, bias)
    scores = (q @ k.transpose(-1, -2)) * float(q.shape[-1]) ** -0.5 + bias  # [N, H, T, S]; float(): a constant in a recording
    return torch.softmax(scores, dim=-1) @ v


def padded_to_blocks(k: Tensor, v: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """[N, H, S, hd] keys and values and their [N or 1, 1, T or 1, S] bias (None: no key masked), with S
    padded to whole key blocks: zero keys and values, the dtype's lowest bias (a copy only where S falls short)."""
    if bias is None:
        bias = k.new_zeros(1, 1, 1, k.shape[-2])
    pad = -int(k.shape[-2]) % KEY_BLOCK  # int(): a recorded step always hands whole blocks, so it records no padding
    if pad:
        k, v, bias = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(bias, (0, pad), value=torch.finfo(k.dtype).min)
    return k, v, bias


def pack_rows(prefix: Tensor, mask: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """[N, P, D] prefix with its [N, P] mask, and [N, T, D] token embeddings -> [N, P + T, D] rows that
    hold each row's real prefix entries in order, then its tokens, then its padding; and [N] where each
    row's tokens end. Padding at the end is never seen by a real position under causal attention."""
    seq = torch.cat([prefix, x], dim=1)  # [N, P + T, D]
    real = torch.cat([mask.bool(), mask.new_ones(x.shape[:2], dtype=torch.bool)], dim=1)  # [N, P + T]
    order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)  # real entries first, in order
    return seq.gather(1, order[..., None].expand(-1, -1, seq.shape[-1])), real.sum(1)
