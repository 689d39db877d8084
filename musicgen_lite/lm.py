"""The MusicGen language model: a pre-norm causal transformer over K parallel codebook streams.

At every sequence step the decoder sees one token per codebook (already interleaved by a
`codebooks.patterns` pattern) and predicts the next step's K tokens with K output heads:

    step s input   : sum_k Embedding_k(tokens[:, k, s]) + sinusoid(position)
    step s output  : K logits over the `card` codes of each codebook -> tokens[:, k, s + 1]

Token id `card` (one past the last code) is the special token: the start step and the empty
slots of a pattern. Conditions reach the decoder in one of two ways:

    "cross"  (MusicGen)        : every layer cross-attends to the projected T5 states
    "prefix" (MusicGen-Melody) : [chroma | text | audio tokens] form one causal sequence

The layer layout, the sinusoid and the projections follow MusicGen exactly (same maths as
transformers' `MusicgenForCausalLM`), so real checkpoints load by renaming tensors; q/k/v and the
K heads are stored fused so that one decoding step is a few large matrix products.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class LMConfig:
    num_codebooks: int = 4
    card: int = 2048  # codes per codebook; id `card` is the special (start / empty) token
    dim: int = 1024
    num_heads: int = 16
    num_layers: int = 24
    ffn_dim: int = 4096
    activation: str = "gelu"
    conditioning: str = "cross"  # "cross" (MusicGen) or "prefix" (MusicGen-Melody)
    pattern: str = "delay"
    dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.conditioning not in ("cross", "prefix"):
            raise ValueError(f"conditioning must be 'cross' or 'prefix', got {self.conditioning!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")

    @property
    def special_token(self) -> int:
        return self.card

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class LMConditions:
    """What the decoder listens to, already projected to the model width (N rows = batch, or
    2 x batch with the null rows of classifier-free guidance stacked after the conditional ones)."""

    cross: Tensor | None = None  # [N, L, D] cross-attention memory ("cross" models)
    cross_mask: Tensor | None = None  # [N, L] 1 = attend, 0 = padding
    prefix: Tensor | None = None  # [N, P, D] embeddings placed before the tokens ("prefix" models)

    @property
    def rows(self) -> int:
        t = self.cross if self.cross is not None else self.prefix
        return 0 if t is None else t.shape[0]


def sinusoids(positions: Tensor, dim: int) -> Tensor:
    """[T] positions -> [T, dim] embeddings: cos on the first half, sin on the second (MusicGen's)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = positions.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class KVCache:
    """Preallocated keys/values for every layer: [layers, N, heads, max_len, head_dim] each."""

    def __init__(self, cfg: LMConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_layers, rows, cfg.num_heads, max_len, cfg.dim // cfg.num_heads)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far
        self.cross: list[tuple[Tensor, Tensor]] | None = None  # per layer, computed once
        self.cross_bias: Tensor | None = None  # [N, 1, 1, L] additive mask


class SelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.dropout = cfg.num_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [N,H,T,hd]
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            start, end = cache.length, cache.length + t
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            if t == 1:  # one new query sees every cached key
                y = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # several new queries after a filled cache: causal by absolute position
                allowed = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.dropout = cfg.num_heads, cfg.dropout
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def memory(self, cross: Tensor) -> tuple[Tensor, Tensor]:
        """[N, L, D] condition states -> keys, values [N, H, L, hd]; computed once per generation."""
        n, length, d = cross.shape
        k, v = self.kv(cross).view(n, length, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.heads, d // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = cfg.dropout
        self.norm_self = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg) if cfg.conditioning == "cross" else None
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if self.cross_attn else None
        self.norm_ffn = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None, layer: int, cross_kv=None, cross_bias=None) -> Tensor:
        drop = self.dropout if self.training else 0.0
        x = x + F.dropout(self.self_attn(self.norm_self(x), cache, layer), drop, self.training)
        if self.cross_attn is not None:
            x = x + F.dropout(self.cross_attn(self.norm_cross(x), cross_kv, cross_bias), drop, self.training)
        h = self.fc2(F.dropout(self.act(self.fc1(self.norm_ffn(x))), drop, self.training))
        return x + F.dropout(h, drop, self.training)


class TransformerLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.num_codebooks))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.heads = nn.Linear(cfg.dim, cfg.num_codebooks * cfg.card, bias=False)  # K heads, fused
        self._positions = torch.empty(0, cfg.dim)

    def positions(self, start: int, length: int, like: Tensor) -> Tensor:
        """Sinusoids for absolute positions [start, start + length), cached and grown on demand."""
        if self._positions.shape[0] < start + length:
            self._positions = sinusoids(torch.arange(max(2 * (start + length), 256)), self.cfg.dim)
        return self._positions[start : start + length].to(like)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """[N, K, T] token ids -> [N, T, D], the sum of the K codebook embeddings."""
        x = self.embed[0](tokens[:, 0])
        for k in range(1, self.cfg.num_codebooks):
            x = x + self.embed[k](tokens[:, k])
        return x

    @staticmethod
    def cross_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """[N, L] 0/1 mask -> [N, 1, 1, L] additive bias. Masked keys get the dtype's lowest finite
        value (not -inf) so that a fully masked null row averages its (zero) values, as MusicGen does."""
        if mask is None:
            return None
        return ((1.0 - mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]

    def forward(self, tokens: Tensor, conditions: LMConditions) -> Tensor:
        """Teacher-forced pass for training: [B, K, S] tokens -> [B, K, S, card] logits (position s
        predicts step s + 1). For prefix models the prefix positions are dropped from the output."""
        x = self.embed_tokens(tokens)
        prefix = 0
        if conditions.prefix is not None:
            prefix = conditions.prefix.shape[1]
            x = torch.cat([conditions.prefix.to(x), x], dim=1)
        x = x + self.positions(0, x.shape[1], x)
        x = F.dropout(x, self.cfg.dropout, self.training)
        cross_kv, bias = self._cross(conditions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, None, i, cross_kv[i] if cross_kv else None, bias)
        return self._logits(self.norm(x[:, prefix:]))

    def _cross(self, conditions: LMConditions, dtype: torch.dtype):
        if self.cfg.conditioning != "cross":
            return None, None
        if conditions.cross is None:
            raise ValueError("a cross-attention model needs `cross` conditions")
        cross = conditions.cross.to(dtype)
        return [layer.cross_attn.memory(cross) for layer in self.layers], self.cross_bias(conditions.cross_mask, dtype)

    def _logits(self, h: Tensor) -> Tensor:
        n, t, _ = h.shape
        return self.heads(h).view(n, t, self.cfg.num_codebooks, self.cfg.card).transpose(1, 2)  # [N,K,T,card]

    # -- incremental decoding -------------------------------------------------------------------
    def new_cache(self, conditions: LMConditions, max_steps: int) -> KVCache:
        """A cache for `max_steps` token steps (plus the prefix), with cross keys/values computed once."""
        rows = conditions.rows
        prefix = 0 if conditions.prefix is None else conditions.prefix.shape[1]
        param = self.heads.weight
        cache = KVCache(self.cfg, rows, prefix + max_steps, param.dtype, param.device)
        if self.cfg.conditioning == "cross":
            cache.cross, cache.cross_bias = self._cross(conditions, param.dtype)
        return cache

    def step(self, tokens: Tensor, cache: KVCache, conditions: LMConditions | None = None) -> Tensor:
        """Feed new steps [N, K, T] (T >= 1) through the cache; returns the logits of the last step,
        [N, K, card]. The prefix (prefix models) is prepended on the first call, when the cache is empty."""
        x = self.embed_tokens(tokens)
        if cache.length == 0 and conditions is not None and conditions.prefix is not None:
            x = torch.cat([conditions.prefix.to(x), x], dim=1)
        x = x + self.positions(cache.length, x.shape[1], x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, cache.cross[i] if cache.cross else None, cache.cross_bias)
        cache.length += x.shape[1]
        return self._logits(self.norm(x[:, -1:]))[:, :, 0]
