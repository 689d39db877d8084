"""The decoding loop's step: one new token per row through a filled cache, as one flat function.

`TransformerLM.step` hands its one-token calls here. The arithmetic is the layers' forward, operation for
operation (so the numbers are the same), without module calls, reshapes and a per-codebook loop: a
single position needs no head transposes ([N, H, 1, hd] is [N, D]) and a small model's K embeddings are
one lookup in their stacked table (a large one reads its K tables in place, not copied). Packed prefix
rows (`KVCache.lag`) each write and attend at their own position, and independent rows cross-attend
through `rows.row_invariant_attention`, as in the layers' forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import linear
from .rows import padded_keys, row_invariant_attention

if TYPE_CHECKING:
    from .lm import KVCache, TransformerLM


def step_one(lm: TransformerLM, tokens: Tensor, cache: KVCache) -> Tensor:
    """`TransformerLM.step` for one new token per row [N, K] after a filled cache -> [N, K, codebook_size] logits."""
    cfg = lm.cfg
    n, d, heads, eps = tokens.shape[0], cfg.dim, cfg.num_heads, cfg.norm_eps
    if cache.embed_table is not None:
        offsets = torch.arange(cfg.num_codebooks, device=tokens.device) * (cfg.codebook_size + 1)
        x = F.embedding(tokens + offsets, cache.embed_table).sum(1)  # [N, D]: e_0 + e_1 + ... in order
    else:  # the same sum, each table read where it lies (no stacked copy of a large model's tables)
        x = torch.stack([F.embedding(tokens[:, k], e.weight) for k, e in enumerate(lm.embed)], 1).sum(1)
    pos, end, rows, bias = cache.length, cache.length + 1, torch.arange(n, device=x.device), None
    if cache.lag is None:
        x = x + lm.positions(pos, 1, x)[0]
    else:  # each row at its own position, which is its cache slot; it sees its own filled slots
        at = pos - cache.lag  # [N]
        x = x + lm.positions(0, end, x)[at]
        if cache.step_bias is None:  # [N, 1, 1, capacity]: 0 at the slots a row has filled, lowest elsewhere
            slots = torch.arange(cache.k.shape[3], device=x.device)
            cache.step_bias = lm.key_bias(slots < at[:, None])[:, None, None]
        cache.step_bias[rows, 0, 0, at] = 0  # the slot each row fills now
        keys = padded_keys(end)  # whole key blocks: the cache's unwritten slots are zero, the bias masks them
        bias = cache.step_bias[..., :keys]  # [N, 1, 1, S]
    cross_attention = row_invariant_attention if cache.independent_rows else F.scaled_dot_product_attention
    for i, layer in enumerate(lm.layers):
        norm = layer.norm_self
        h = F.layer_norm(x, (d,), norm.weight, norm.bias, eps)
        q, k, v = linear(layer.self_attn.qkv, h, cache).view(n, 3, heads, 1, d // heads).unbind(1)  # [N, H, 1, hd]
        if bias is None:
            cache.k[i, :, :, pos:end] = k
            cache.v[i, :, :, pos:end] = v
            y = F.scaled_dot_product_attention(q, cache.k[i, :, :, :end], cache.v[i, :, :, :end])
        else:
            cache.k[i][rows, :, at] = k[:, :, 0]
            cache.v[i][rows, :, at] = v[:, :, 0]
            y = row_invariant_attention(q, cache.k[i, :, :, :keys], cache.v[i, :, :, :keys], bias)
        x = x + linear(layer.self_attn.out, y.view(n, d), cache)
        if layer.cross_attn is not None and cache.attending:
            a, norm = cache.attending, layer.norm_cross
            h = F.layer_norm(x[:a], (d,), norm.weight, norm.bias, eps)
            q = linear(layer.cross_attn.q, h, cache).view(a, heads, 1, d // heads)
            y = cross_attention(q, *cache.cross[i], cache.cross_bias)
            h = linear(layer.cross_attn.out, y.view(a, d), cache)
            x = x + h if a == n else torch.cat([x[:a] + h, x[a:]])
        norm = layer.norm_ffn
        h = F.layer_norm(x, (d,), norm.weight, norm.bias, eps)
        x = x + linear(layer.fc2, layer.act(linear(layer.fc1, h, cache)), cache)
    cache.length += 1
    h = F.layer_norm(x, (d,), lm.norm.weight, lm.norm.bias, eps)
    return linear(lm.heads, h, cache).view(n, cfg.num_codebooks, cfg.codebook_size)
