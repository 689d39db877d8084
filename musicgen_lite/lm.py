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

A decoding step multiplies a handful of rows (the conditional and null rows of classifier-free
guidance) with every weight, so on a CPU it is bound by reading the weights from memory:

    packed weights   BLAS re-packs the weight of a few-row product at every call, reading it
                     more than once; `new_cache` keeps copies of the step's weights in oneDNN's
                     blocked layout (made once, kept while the weights are unchanged), which a
                     product streams once
    null rows        the null rows' text states are zero under an all-zero mask, so their
                     cross-attention output is exactly zero: they skip it
    set_precision    bf16, fp16 or int8 weights: fewer bytes per step, at some cost in exactness
    one-token step   the sampling loop's steps run the layers' arithmetic as one flat function
                     (`_step_one`): no module calls, no head transposes, one embedding lookup

The sampling loop runs these steps on `TransformerLM.decode_threads` intra-op threads, by default all
that torch is allowed to use (see sampling.py).
"""

from __future__ import annotations

import math
import warnings
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
    """Decoding state: preallocated keys/values [layers, N, heads, max_len, head_dim], the number of
    positions filled, the cross-attention keys/values of rows [0, attending) (computed once; the rows
    after them are silent, their cross-attention output is zero) and the packed step weights."""

    def __init__(self, cfg: LMConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_layers, rows, cfg.num_heads, max_len, cfg.dim // cfg.num_heads)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far
        self.cross: list[tuple[Tensor, Tensor]] | None = None  # per layer, [attending, H, L, hd] each
        self.cross_bias: Tensor | None = None  # [attending, 1, 1, L] additive mask
        self.attending = rows
        self.packed: dict[nn.Module, Tensor] = {}  # Linear -> its weight in oneDNN's layout
        self.embed_table: Tensor | None = None  # [K * (card + 1), D] the K embedding tables, stacked


def linear(module: nn.Module, x: Tensor, cache: KVCache | None) -> Tensor:
    """module(x) for a bias-free linear layer, through the packed copy of its weight when the cache has one."""
    packed = None if cache is None else cache.packed.get(module)
    if packed is None:
        return module(x)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class SelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.dropout = cfg.num_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        n, t, d = x.shape
        q, k, v = linear(self.qkv, x, cache).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [N,H,T,hd]
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
        return linear(self.out, y.transpose(1, 2).reshape(n, t, d), cache)


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

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], bias: Tensor | None, cache: KVCache | None = None) -> Tensor:
        n, t, d = x.shape
        q = linear(self.q, x, cache).view(n, t, self.heads, d // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return linear(self.out, y.transpose(1, 2).reshape(n, t, d), cache)


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

    def drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, True) if self.training and self.dropout > 0 else x

    def forward(self, x: Tensor, cache: KVCache | None, layer: int, cross_kv=None, cross_bias=None) -> Tensor:
        """x [N, T, D]. With a cache, only its rows [0, cache.attending) cross-attend; the others' update is zero."""
        x = x + self.drop(self.self_attn(self.norm_self(x), cache, layer))
        if self.cross_attn is not None:
            n = x.shape[0] if cache is None else cache.attending
            if n:
                h = self.drop(self.cross_attn(self.norm_cross(x[:n]), cross_kv, cross_bias, cache))
                x = x + h if n == x.shape[0] else torch.cat([x[:n] + h, x[n:]])
        h = linear(self.fc2, self.drop(self.act(linear(self.fc1, self.norm_ffn(x), cache))), cache)
        return x + self.drop(h)


PRECISIONS = ("fp32", "bf16", "fp16", "int8")


class PackedLinear(nn.Module):
    """Inference-only stand-in for a bias-free nn.Linear, its weight packed for fbgemm: "fp16" keeps
    half-precision weights (fp32 activations and sums); "int8" keeps symmetric per-output-channel int8
    weights and quantises the activations on the fly (dynamic quantisation)."""

    def __init__(self, weight: Tensor, precision: str):
        super().__init__()
        self.precision = precision
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float().contiguous()
        with warnings.catch_warnings():  # torch marks its quantised-tensor constructors as deprecated
            warnings.simplefilter("ignore")
            if precision == "fp16":
                self.packed = torch.ops.quantized.linear_prepack_fp16(w, None)
            else:
                scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()  # [out]
                q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(q, None)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.precision == "fp16":
            y = torch.ops.quantized.linear_dynamic_fp16(flat, self.packed)
        else:  # reduce_range: 7-bit activations, so that fbgemm's int16 pair sums cannot saturate
            y = torch.ops.quantized.linear_dynamic(flat, self.packed, True)
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"an LM converted to {self.precision} is for inference only; save it before set_precision")


class TransformerLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.precision = "fp32"
        # intra-op threads of the sampling loop on a CPU; None: the threads torch is allowed to use
        # (torch.get_num_threads()). A `threads` argument of the sampling loop wins over it.
        self.decode_threads: int | None = None
        self.embed = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.num_codebooks))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.heads = nn.Linear(cfg.dim, cfg.num_codebooks * cfg.card, bias=False)  # K heads, fused
        self._positions = torch.empty(0, cfg.dim)
        # name -> (weight, (its address, its version), oneDNN copy); holding the weight keeps another
        # tensor from taking its address while the copy is kept
        self._packed: dict[str, tuple[Tensor, tuple[int, int], Tensor]] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_packed": {}}  # oneDNN tensors do not pickle or copy; they are remade

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and of the KV cache."""
        return self.norm.weight.dtype

    def set_precision(self, precision: str) -> TransformerLM:
        """Store the weights in fewer bytes for faster, inexact inference (CPU decoding reads every
        weight once per step). "bf16": every weight, activation and the cache in bfloat16. "fp16" /
        "int8": the Linear weights packed for fbgemm (x86 CPUs), the rest in fp32. "fp32" is the
        default and the exact one. Only an fp32 model converts, and fp16 / int8 ones cannot be saved."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == self.precision:
            return self
        if self.precision != "fp32":
            raise ValueError(f"this LM is already {self.precision}; convert an fp32 model instead")
        if precision == "bf16":
            self.to(torch.bfloat16)
        else:
            if self.device.type != "cpu":
                raise ValueError(f"{precision} weights use fbgemm, a CPU backend; the LM is on {self.device}")
            linears = [(m, name, c) for m in self.modules() for name, c in m.named_children() if isinstance(c, nn.Linear)]
            for module, name, child in linears:
                setattr(module, name, PackedLinear(child.weight, precision))
        self.precision = precision
        self._packed = {}
        return self

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
        cross_kv, bias = self._cross(conditions.cross, conditions.cross_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, None, i, cross_kv[i] if cross_kv else None, bias)
        return self._logits(self.norm(x[:, prefix:]), None)

    def _cross(self, cross: Tensor | None, mask: Tensor | None):
        """Per-layer cross-attention keys/values of [N, L, D] states, and the [N, 1, 1, L] bias."""
        if self.cfg.conditioning != "cross":
            return None, None
        if cross is None:
            raise ValueError("a cross-attention model needs `cross` conditions")
        cross = cross.to(self.dtype)
        return [layer.cross_attn.memory(cross) for layer in self.layers], self.cross_bias(mask, self.dtype)

    def _logits(self, h: Tensor, cache: KVCache | None) -> Tensor:
        n, t, _ = h.shape
        return linear(self.heads, h, cache).view(n, t, self.cfg.num_codebooks, self.cfg.card).transpose(1, 2)  # [N,K,T,card]

    # -- incremental decoding -------------------------------------------------------------------
    def new_cache(self, conditions: LMConditions, max_steps: int) -> KVCache:
        """A cache for `max_steps` token steps (plus the prefix), with cross keys/values computed once
        for the rows that can see anything, and (CPU) the step's weights packed for oneDNN."""
        rows = conditions.rows
        prefix = 0 if conditions.prefix is None else conditions.prefix.shape[1]
        cache = KVCache(self.cfg, rows, prefix + max_steps, self.dtype, self.device)
        if self.cfg.conditioning == "cross":
            cache.attending = attending_rows(conditions.cross, conditions.cross_mask)
            mask = None if conditions.cross_mask is None else conditions.cross_mask[: cache.attending]
            cache.cross, cache.cross_bias = self._cross(conditions.cross[: cache.attending], mask)
        cache.packed = self._packed_weights(rows)
        cache.embed_table = torch.cat([e.weight for e in self.embed]).detach()
        return cache

    def _packed_weights(self, rows: int) -> dict[nn.Module, Tensor]:
        """oneDNN copies of the step's Linear weights, made for `rows`-row products and reused until a
        weight changes (new storage or an in-place update). {} where oneDNN cannot take the dtype."""
        supported = {torch.float32: True, torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported()}
        if self.device.type != "cpu" or not torch.backends.mkldnn.is_available() or not supported.get(self.dtype):
            return {}
        step_linears = {n: m for n, m in self.named_modules() if isinstance(m, nn.Linear) and not n.endswith("cross_attn.kv")}
        packed = {}
        for name, module in step_linears.items():
            w = module.weight
            stamp = (w.data_ptr(), w._version)
            cached = self._packed.get(name)
            if cached is None or cached[0] is not w or cached[1] != stamp:
                self._packed[name] = (w, stamp, torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows))
            packed[module] = self._packed[name][2]
        return packed

    def step(self, tokens: Tensor, cache: KVCache, conditions: LMConditions | None = None) -> Tensor:
        """Feed new steps [N, K, T] (T >= 1) through the cache; returns the logits of the last step,
        [N, K, card]. The prefix (prefix models) is prepended on the first call, when the cache is empty."""
        if tokens.shape[-1] == 1 and cache.length and not self.training:
            return self._step_one(tokens[:, :, 0], cache)
        x = self.embed_tokens(tokens)
        if cache.length == 0 and conditions is not None and conditions.prefix is not None:
            x = torch.cat([conditions.prefix.to(x), x], dim=1)
        x = x + self.positions(cache.length, x.shape[1], x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, cache.cross[i] if cache.cross else None, cache.cross_bias)
        cache.length += x.shape[1]
        return self._logits(self.norm(x[:, -1:]), cache)[:, :, 0]


    def _step_one(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """`step` for one new token per row [N, K] after a filled cache, the decoding loop's case: the same
        operations as the layers' forward (so the same numbers), without their module calls, reshapes
        and per-codebook loop. A single position needs no head transposes: [N, H, 1, hd] is [N, D]."""
        cfg = self.cfg
        n, d, heads, eps = tokens.shape[0], cfg.dim, cfg.num_heads, cfg.norm_eps
        offsets = torch.arange(cfg.num_codebooks, device=tokens.device) * (cfg.card + 1)
        x = F.embedding(tokens + offsets, cache.embed_table).sum(1)  # [N, D]: e_0 + e_1 + ... in order
        pos = cache.length
        x = x + self.positions(pos, 1, x)[0]
        for i, layer in enumerate(self.layers):
            norm = layer.norm_self
            h = F.layer_norm(x, (d,), norm.weight, norm.bias, eps)
            q, k, v = linear(layer.self_attn.qkv, h, cache).view(n, 3, heads, 1, d // heads).unbind(1)  # [N, H, 1, hd]
            cache.k[i, :, :, pos : pos + 1] = k
            cache.v[i, :, :, pos : pos + 1] = v
            y = F.scaled_dot_product_attention(q, cache.k[i, :, :, : pos + 1], cache.v[i, :, :, : pos + 1])
            x = x + linear(layer.self_attn.out, y.view(n, d), cache)
            if layer.cross_attn is not None and cache.attending:
                a, norm = cache.attending, layer.norm_cross
                h = F.layer_norm(x[:a], (d,), norm.weight, norm.bias, eps)
                q = linear(layer.cross_attn.q, h, cache).view(a, heads, 1, d // heads)
                y = F.scaled_dot_product_attention(q, *cache.cross[i], attn_mask=cache.cross_bias)
                h = linear(layer.cross_attn.out, y.view(a, d), cache)
                x = x + h if a == n else torch.cat([x[:a] + h, x[a:]])
            norm = layer.norm_ffn
            h = F.layer_norm(x, (d,), norm.weight, norm.bias, eps)
            x = x + linear(layer.fc2, layer.act(linear(layer.fc1, h, cache)), cache)
        cache.length += 1
        h = F.layer_norm(x, (d,), self.norm.weight, self.norm.bias, eps)
        return linear(self.heads, h, cache).view(n, cfg.num_codebooks, cfg.card)


def attending_rows(cross: Tensor, mask: Tensor | None) -> int:
    """n such that rows [n, N) of [N, L, D] cross states are silent: all-zero states under an all-zero
    mask [N, L]. A silent row's cross-attention averages zero values (no key is preferred, and the
    key/value projections have no bias), so its output is exactly zero."""
    if mask is None:
        return cross.shape[0]
    silent = (mask == 0).all(1) & (cross == 0).flatten(1).all(1)  # [N]
    loud = (~silent).nonzero()
    return int(loud[-1]) + 1 if len(loud) else 0
