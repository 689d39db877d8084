"""The MusicGen language model: a pre-norm causal transformer over K parallel codebook streams.

At every sequence step the decoder sees one token per codebook (already interleaved by a
`codebooks.patterns` pattern) and predicts the next step's K tokens with K output heads:

    step s input   : sum_k Embedding_k(tokens[:, k, s]) + sinusoid(position)
    step s output  : K logits over the `codebook_size` codes of each codebook -> tokens[:, k, s + 1]

Token id `codebook_size` (one past the last code) is the special token: the start step and the empty
slots of a pattern. Conditions reach the decoder in one of two ways:

    "cross"  (MusicGen)        : every layer cross-attends to the projected T5 states
    "prefix" (MusicGen-Melody) : [chroma | text | audio tokens] form one causal sequence

A batch pads its texts to the longest. Transformers places every prefix row's audio after the padded
prefix; with `LMConditions.independent_rows` each prefix row is packed instead (its own prefix, then
its tokens, then the padding) and steps from its own positions, and attention over padded keys goes
through `rows.row_invariant_attention`, so that the padding changes no bit of a row: its output is then
independent of the rest of the batch.

The layer layout, the sinusoid and the projections follow MusicGen exactly (same maths as
transformers' `MusicgenForCausalLM`), so real checkpoints load by renaming tensors; q/k/v and the
K heads are stored fused so that one decoding step is a few large matrix products.

A decoding step multiplies a handful of rows (the conditional and null rows of classifier-free
guidance) with every weight, so on a CPU it is bound by reading the weights from memory:

    packed weights   BLAS re-packs the weight of a few-row product at every call, reading it
                     more than once; `new_cache` moves the step's weights into oneDNN's blocked
                     layout, which a product streams once (in place of the plain weights, which
                     come back exactly on any other use; see packing.py)
    null rows        the null rows' text states are zero under an all-zero mask, so their
                     cross-attention output is exactly zero: they skip it
    set_precision    bf16, fp16 or int8 weights: fewer bytes per step, at some cost in exactness
    one-token step   the sampling loop's steps run the layers' arithmetic as one flat function
                     (one_step.py): no module calls, no head transposes, one embedding lookup; a
                     small fp16 / int8 model records it once per batch layout and replays it without Python

The sampling loop runs these steps on `TransformerLM.decoding_threads()` intra-op threads: the
`decode_threads` setting when given, else all that torch is allowed to use, except for a model whose
step reads less than SMALL_STEP_BYTES of weights: that step is bound by per-operation overhead, and
whether more threads help it depends on the machine's load, so the loop times one thread against all
(the bundled model, 2 cores: idle, 13x real time on two threads and 10x on one; busy, the reverse).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .one_step import recordable, recorded_step, step_one
from .packing import PackedLinear, linear, pack, packed_weight, trim_heap
from .rows import pack_rows, padded_keys, padded_to_blocks, row_invariant_attention
from .weight_files import release

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
    codebook_size: int = 2048  # codes per codebook; id `codebook_size` is the special (start / empty) token
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
        return self.codebook_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        """The config a saved model's "lm" entry describes; keys of earlier versions ("card") load under
        their present names, and a key this version does not know is an error, never a silent default."""
        d = {RENAMED_KEYS.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LM config keys {', '.join(unknown)}")
        return cls(**d)


# Keys of saved configs that have since been renamed: old name -> present name.
RENAMED_KEYS = {"card": "codebook_size"}


@dataclass
class LMConditions:
    """What the decoder listens to, already projected to the model width (N rows = batch, or
    2 x batch with the null rows of classifier-free guidance stacked after the conditional ones)."""

    cross: Tensor | None = None  # [N, L, D] cross-attention memory ("cross" models)
    cross_mask: Tensor | None = None  # [N, L] 1 = attend, 0 = padding
    prefix: Tensor | None = None  # [N, P, D] embeddings placed before the tokens ("prefix" models)
    prefix_mask: Tensor | None = None  # [N, P] 1 = a real prefix entry, 0 = padding (for independent_rows)
    # decoding computes each row so that no bit of it depends on the other rows: prefix rows packed (real
    # entries, then tokens) at their own positions, padded keys through row_invariant_attention. False:
    # transformers' layout, the prefix padded and its positions shared by all rows
    independent_rows: bool = False

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

    def __init__(self, cfg: LMConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 independent_rows: bool = False):
        if independent_rows:  # whole key blocks, so that row_invariant_attention reads the cache without padding it
            max_len = padded_keys(max_len)
        shape = (cfg.num_layers, rows, cfg.num_heads, max_len, cfg.dim // cfg.num_heads)
        alloc = torch.zeros if independent_rows else torch.empty  # packed rows mask slots they never wrote
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far
        self.independent_rows = independent_rows
        # packed prefix rows: how far each row's own position trails `length` [N], the cache slots
        # (= positions) of the step's inputs [N, T] and the additive bias of the keys they see [N, 1, T, S]
        self.lag: Tensor | None = None
        self.rows_at: Tensor | None = None
        self.rows_bias: Tensor | None = None
        self.step_bias: Tensor | None = None  # one-token steps: [N, 1, 1, max_len], kept and updated slot by slot
        self.cross: list[tuple[Tensor, Tensor]] | None = None  # per layer, [attending, H, L, hd] each
        self.cross_bias: Tensor | None = None  # [attending, 1, 1, L] additive mask
        self.attending = rows
        self.packed: dict[nn.Module, Tensor] = {}  # Linear -> its weight in oneDNN's layout
        self.embed_table: Tensor | None = None  # [K * (codebook_size + 1), D] a small model's K embedding tables, stacked
        self.embed_offsets = torch.arange(cfg.num_codebooks, device=device) * (cfg.codebook_size + 1)  # [K] each table's start
        self.slots = torch.arange(max_len, device=device)  # [max_len] slot (= position) ids
        self.num_rows = rows
        self.rows = torch.arange(rows, device=device)  # [N] row ids
        self.positions = torch.empty(0)  # [max_len, D] the sinusoids of every slot, set by `new_cache`
        self.step_graph: torch.jit.ScriptModule | None = None  # the recorded one-token step of its layout (one_step.py)


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
            if cache.rows_at is None:
                cache.k[layer, :, :, start:end] = k
                cache.v[layer, :, :, start:end] = v
            else:  # each row writes at its own positions
                rows = torch.arange(n, device=x.device)[:, None]
                cache.k[layer][rows, :, cache.rows_at] = k.transpose(1, 2)
                cache.v[layer][rows, :, cache.rows_at] = v.transpose(1, 2)
            # packed rows: their bias covers whole key blocks, past `end` the cache holds zeros (no padding copy)
            keys = end if cache.rows_bias is None else cache.rows_bias.shape[-1]
            k, v = cache.k[layer, :, :, :keys], cache.v[layer, :, :, :keys]
            if cache.rows_bias is not None:
                y = row_invariant_attention(q, k, v, cache.rows_bias)
            elif t == 1:  # one new query sees every cached key
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
        if cache is not None and cache.independent_rows:  # the batch's text padding changes no bit of a row
            y = row_invariant_attention(q, kv[0], kv[1], bias)
        else:
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


SMALL_STEP_BYTES = 64 * 2**20  # fp32 weights of a step below which one decoding thread can beat several


def step_weight_bytes(cfg: LMConfig) -> int:
    """fp32 bytes of the weights one decoding step reads: the layers, the embeddings and the heads."""
    layer = 4 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_dim
    return 4 * (cfg.num_layers * layer + 2 * cfg.num_codebooks * (cfg.codebook_size + 1) * cfg.dim)


def overhead_bound(cfg: LMConfig) -> bool:
    """Whether a decoding step is bound by per-operation overhead rather than by reading its weights:
    then fewer operations pay (one stacked embedding lookup), and one thread may beat several."""
    return step_weight_bytes(cfg) < SMALL_STEP_BYTES


class TransformerLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.precision = "fp32"
        # intra-op threads of the sampling loop on a CPU; None: decoding_threads() chooses. A `threads`
        # argument of the sampling loop wins over it.
        self.decode_threads: int | None = None
        # whether a small fp16 / int8 model's cache records its one-token step and replays it (one_step.py)
        self.record_steps = True
        self.embed = nn.ModuleList(nn.Embedding(cfg.codebook_size + 1, cfg.dim) for _ in range(cfg.num_codebooks))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.heads = nn.Linear(cfg.dim, cfg.num_codebooks * cfg.codebook_size, bias=False)  # K heads, fused
        self._positions = torch.empty(0, cfg.dim)

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
        # each fp32 weight once converted: where it views a mapped checkpoint, its pages go back (`release`)
        if precision == "bf16":  # the LM has no buffers, so this is `self.to(torch.bfloat16)`, one weight at a time
            for param in self.parameters():
                weight = param.data
                param.data = weight.to(torch.bfloat16)
                release(weight)
        else:
            if self.device.type != "cpu":
                raise ValueError(f"{precision} weights use fbgemm, a CPU backend; the LM is on {self.device}")
            linears = [(m, name, c) for m in self.modules() for name, c in m.named_children() if isinstance(c, nn.Linear)]
            for module, name, child in linears:
                weight = child.weight.data
                setattr(module, name, PackedLinear(weight, precision))
                release(weight)
        self.precision = precision
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

    def key_bias(self, allowed: Tensor) -> Tensor:
        """A boolean mask of the keys a query may see -> the additive bias of `cross_bias`."""
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(self.dtype).min)

    def forward(self, tokens: Tensor, conditions: LMConditions) -> Tensor:
        """Teacher-forced pass for training: [B, K, S] tokens -> [B, K, S, codebook_size] logits (position s
        predicts step s + 1). For prefix models the prefix positions are dropped from the output."""
        return self.logits(self.states(tokens, conditions))

    def states(self, tokens: Tensor, conditions: LMConditions) -> Tensor:
        """The teacher-forced pass up to the heads: [B, K, S] tokens -> [B, S, D] final (normed) states at
        the tokens' positions, what `logits` reads."""
        x = self.embed_tokens(tokens)
        steps = x.shape[1]
        ends = torch.full((x.shape[0],), steps, device=x.device)  # [B] where each row's tokens end
        if conditions.prefix is not None and conditions.independent_rows:
            x, ends = pack_rows(conditions.prefix.to(x), conditions.prefix_mask, x)
        elif conditions.prefix is not None:
            x = torch.cat([conditions.prefix.to(x), x], dim=1)
            ends += conditions.prefix.shape[1]
        x = x + self.positions(0, x.shape[1], x)
        x = F.dropout(x, self.cfg.dropout, self.training)
        cross_kv, bias = self._cross(conditions.cross, conditions.cross_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, None, i, cross_kv[i] if cross_kv else None, bias)
        at = ends[:, None] - steps + torch.arange(steps, device=x.device)  # [B, S] the tokens' positions
        return self.norm(x.gather(1, at[..., None].expand(-1, -1, x.shape[-1])))

    def _cross(self, cross: Tensor | None, mask: Tensor | None):
        """Per-layer cross-attention keys/values of [N, L, D] states, and the [N, 1, 1, L] bias."""
        if self.cfg.conditioning != "cross":
            return None, None
        if cross is None:
            raise ValueError("a cross-attention model needs `cross` conditions")
        cross = cross.to(self.dtype)
        return [layer.cross_attn.memory(cross) for layer in self.layers], self.cross_bias(mask, self.dtype)

    def logits(self, h: Tensor, cache: KVCache | None = None) -> Tensor:
        """[N, T, D] final states -> [N, K, T, codebook_size] logits of every codebook."""
        n, t, _ = h.shape
        return linear(self.heads, h, cache).view(n, t, self.cfg.num_codebooks, self.cfg.codebook_size).transpose(1, 2)  # [N,K,T,codebook_size]

    # -- incremental decoding -------------------------------------------------------------------
    def decoding_threads(self, independent_rows: bool = False) -> tuple[int, ...]:
        """The intra-op thread counts the sampling loop may decode on (`threads.FastestThreads` times the
        candidates and picks): `decode_threads` when set; all that torch may use for a model whose step
        reads SMALL_STEP_BYTES or more. A smaller step is overhead-bound, and one thread or all may win
        with the machine's load: both are candidates when the rows are decoded independently (that
        attention gives the same numbers on any thread count), else one thread (fused attention splits
        its keys by thread count, and a choice by timing would make the tokens depend on the machine)."""
        if self.decode_threads is not None:
            return (self.decode_threads,)
        everything = torch.get_num_threads()
        if not overhead_bound(self.cfg):
            return (everything,)
        return (1, everything) if independent_rows else (1,)

    @torch.no_grad()
    def new_cache(self, conditions: LMConditions, max_steps: int) -> KVCache:
        """A cache for `max_steps` token steps (plus the prefix), with cross keys/values computed once
        for the rows that can see anything, and (CPU) the step's weights packed for oneDNN. Decoding
        state only: nothing in it tracks gradients."""
        rows = conditions.rows
        prefix = 0 if conditions.prefix is None else conditions.prefix.shape[1]
        cache = KVCache(self.cfg, rows, prefix + max_steps, self.dtype, self.device, conditions.independent_rows)
        if self.cfg.conditioning == "cross":
            cache.attending = attending_rows(conditions.cross, conditions.cross_mask)
            mask = None if conditions.cross_mask is None else conditions.cross_mask[: cache.attending]
            cache.cross, cache.cross_bias = self._cross(conditions.cross[: cache.attending], mask)
            if conditions.independent_rows and cache.cross:  # padded to whole key blocks once, not at every step
                padded = [padded_to_blocks(k, v, cache.cross_bias) for k, v in cache.cross]
                cache.cross, cache.cross_bias = [(k, v) for k, v, _ in padded], padded[0][2]
        cache.packed = self._packed_weights(rows)
        cache.positions = self.positions(0, cache.k.shape[3], cache.k)
        if overhead_bound(self.cfg):  # one lookup a step; a large model's tables are read in place, not copied
            cache.embed_table = torch.cat([e.weight for e in self.embed]).detach()
        return cache

    def _packed_weights(self, rows: int) -> dict[nn.Module, Tensor]:
        """The step's Linear weights in oneDNN's layout for `rows`-row products (packed on first use, kept
        until something else uses a weight). {} where oneDNN cannot take the dtype."""
        supported = {torch.float32: True, torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported()}
        if self.device.type != "cpu" or not torch.backends.mkldnn.is_available() or not supported.get(self.dtype):
            return {}
        packed = {}
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("cross_attn.kv"):
                fresh = packed_weight(m) is None
                packed[m] = pack(m, rows)
                if fresh:  # the heap's freed temporaries go back at once: held until the end, they add up
                    trim_heap()
        return packed

    def step(self, tokens: Tensor, cache: KVCache, conditions: LMConditions | None = None) -> Tensor:
        """Feed new steps [N, K, T] (T >= 1) through the cache; returns the logits of the last step,
        [N, K, codebook_size]. The prefix (prefix models) is prepended on the first call, when the cache is empty;
        with a prefix mask the rows are packed there and each row then continues from its own position."""
        if tokens.shape[-1] == 1 and cache.length and not self.training:
            return step_one(self, tokens[:, :, 0], cache)
        x = self.embed_tokens(tokens)
        if cache.length == 0 and conditions is not None and conditions.prefix is not None:
            if conditions.independent_rows:
                x, ends = pack_rows(conditions.prefix.to(x), conditions.prefix_mask, x)
                cache.lag = x.shape[1] - ends
            else:
                x = torch.cat([conditions.prefix.to(x), x], dim=1)
        n, t = x.shape[:2]
        last = torch.full((n,), t - 1, device=x.device)  # [N] each row's last input
        cache.rows_at = cache.rows_bias = cache.step_bias = None
        if cache.lag is None:
            x = x + self.positions(cache.length, t, x)
        else:
            at = torch.arange(t, device=x.device)[None]  # [1, T] the packed first call: every row from 0
            if cache.length:  # later calls: each row at its own positions, which are its cache slots
                at = cache.length - cache.lag[:, None] + at  # [N, T]
                cache.rows_at = at
            else:
                last = last - cache.lag
            x = x + self.positions(0, int(at.max()) + 1, x)[at]
            keys = torch.arange(padded_keys(cache.length + t), device=x.device)
            cache.rows_bias = self.key_bias(keys <= at[..., None])[:, None]  # [N or 1, 1, T, S]: own filled slots
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, cache.cross[i] if cache.cross else None, cache.cross_bias)
        cache.length += t
        if cache.step_graph is None and recordable(self, cache, cache.k.shape[3] - cache.length):
            cache.step_graph = recorded_step(self, cache)
        h = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[-1]))  # [N, 1, D]
        return self.logits(self.norm(h), cache)[:, :, 0]


def attending_rows(cross: Tensor, mask: Tensor | None) -> int:
    """n such that rows [n, N) of [N, L, D] cross states are silent: all-zero states under an all-zero
    mask [N, L]. A silent row's cross-attention averages zero values (no key is preferred, and the
    key/value projections have no bias), so its output is exactly zero."""
    if mask is None:
        return cross.shape[0]
    silent = (mask == 0).all(1) & (cross == 0).flatten(1).all(1)  # [N]
    loud = (~silent).nonzero()
    return int(loud[-1]) + 1 if len(loud) else 0
