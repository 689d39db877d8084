"""The decoding loop's step: one new token per row through a filled cache, as one flat function.

`TransformerLM.step` hands its one-token calls here. The arithmetic is the layers' forward, operation for
operation (so the numbers are the same), without module calls, reshapes and a per-codebook loop: a
single position needs no head transposes ([N, H, 1, hd] is [N, D]) and a small model's K embeddings are
one lookup in their stacked table (a large one reads its K tables in place, not copied). Packed prefix
rows (`KVCache.lag`) each write and attend at their own position, and independent rows cross-attend
through `rows.row_invariant_attention`, as in the layers' forward.

A small model's step is a few hundred small operations, and calling them from Python costs more than
running them. So the step of a cache with many steps ahead is recorded with `torch.jit.trace`
(`StepGraph`) and replayed: the same operations on the same tensors, in the same order, with the
Python work gone (about 40 % of the bundled model's step). Everything that belongs to a cache is an
input of the recording, so that one recording serves every cache of the same layout (rows, packing,
cross-attending rows): the tokens, the cache slot each row writes, the filled part of the cache (its
length is read from the view's shape), the key bias of packed rows, and the cache's tables and
cross-attention memory. Only the LM's own weights are constants of it. (A recording is never freed:
torch keeps traced graphs, and the constants in them, for the life of the process. So recordings are
kept per LM and layout, and made once.)
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packing import PackedLinear, linear
from .rows import padded_keys, row_invariant_attention

if TYPE_CHECKING:
    from .lm import KVCache, TransformerLM

RECORD_MIN_STEPS = 64  # a cache records its step only when at least this many one-token steps lie ahead


def step_one(lm: TransformerLM, tokens: Tensor, cache: KVCache) -> Tensor:
    """`TransformerLM.step` for one new token per row [N, K] after a filled cache -> [N, K, codebook_size] logits."""
    inputs = step_inputs(lm, cache)
    if cache.step_graph is None:
        logits = step_arithmetic(lm, cache, tokens, *inputs)
    else:
        with torch.jit.optimized_execution(False):  # replayed as recorded: no profiling runs, no graph rewrites
            logits = cache.step_graph(tokens, cache_tensors(cache), *inputs)
    cache.length += 1
    return logits


def step_inputs(lm: TransformerLM, cache: KVCache) -> tuple[Tensor, ...]:
    """What the next one-token step reads besides its tokens: the cache slot of each row ([1], or [N] for
    packed prefix rows), the keys and values it attends to ([layers, N, H, S, hd] views of the cache)
    and, for packed rows, their key bias [N, 1, 1, S] (a view of `cache.step_bias`)."""
    pos, end = cache.length, cache.length + 1
    if cache.lag is None:
        return cache.slots[pos:end], cache.k[:, :, :, :end], cache.v[:, :, :, :end]
    at = pos - cache.lag  # [N] each row at its own position, which is its cache slot; it sees its own filled slots
    if cache.step_bias is None:  # [N, 1, 1, capacity]: 0 at the slots a row has filled, lowest elsewhere
        cache.step_bias = lm.key_bias(cache.slots < at[:, None])[:, None, None]
    keys = padded_keys(end)  # whole key blocks: the cache's unwritten slots are zero, the bias masks them
    return at, cache.k[:, :, :, :keys], cache.v[:, :, :, :keys], cache.step_bias[..., :keys]


def cache_tensors(cache: KVCache) -> tuple[Tensor, ...]:
    """The cache's own tensors that the step reads, handed to a recording as inputs."""
    cross = [t for kv in cache.cross or () for t in kv]
    cross_bias = () if cache.cross_bias is None else (cache.cross_bias,)
    return cache.embed_table, cache.embed_offsets, cache.positions, cache.rows, *cross, *cross_bias


def step_arithmetic(lm: TransformerLM, cache: KVCache, tokens: Tensor, at: Tensor, keys: Tensor, values: Tensor,
                    bias: Tensor | None = None) -> Tensor:
    """The step itself (see `step_inputs` for its inputs); writes each row's keys and values at its slot."""
    cfg = lm.cfg
    n, d, heads, eps = cache.num_rows, cfg.dim, cfg.num_heads, cfg.norm_eps  # plain ints, constants in a recording
    if cache.embed_table is not None:
        x = F.embedding(tokens + cache.embed_offsets, cache.embed_table).sum(1)  # [N, D]: e_0 + e_1 + ... in order
    else:  # the same sum, each table read where it lies (no stacked copy of a large model's tables)
        x = torch.stack([F.embedding(tokens[:, k], e.weight) for k, e in enumerate(lm.embed)], 1).sum(1)
    x = x + cache.positions[at]  # [N or 1, D]
    if bias is not None:
        bias[cache.rows, 0, 0, at] = 0  # the slot each row fills now
    cross_attention = row_invariant_attention if cache.independent_rows else F.scaled_dot_product_attention
    for i, layer in enumerate(lm.layers):
        norm = layer.norm_self
        h = F.layer_norm(x, (d,), norm.weight, norm.bias, eps)
        q, k, v = linear(layer.self_attn.qkv, h, cache).view(n, 3, heads, 1, d // heads).unbind(1)  # [N, H, 1, hd]
        layer_keys, layer_values = keys[i], values[i]  # [N, H, S, hd]
        if bias is None:
            layer_keys.index_copy_(2, at, k)
            layer_values.index_copy_(2, at, v)
            y = F.scaled_dot_product_attention(q, layer_keys, layer_values)
        else:
            layer_keys[cache.rows, :, at] = k.squeeze(2)
            layer_values[cache.rows, :, at] = v.squeeze(2)
            y = row_invariant_attention(q, layer_keys, layer_values, bias)
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
    h = F.layer_norm(x, (d,), lm.norm.weight, lm.norm.bias, eps)
    return linear(lm.heads, h, cache).view(n, cfg.num_codebooks, cfg.codebook_size)


class StepGraph(nn.Module):
    """`step_arithmetic` as a module, so that `torch.jit.trace` can record it. fbgemm's packed weights are
    its attributes, because a recording reaches such objects only through the module it records; the LM
    is not a submodule (recording a module converts every submodule, which costs more than the recording
    itself). `state` is `cache_tensors(cache)` of the cache it records: the arithmetic reads those same
    tensors from the cache, and the recording, which knows tensors by identity, takes them as inputs."""

    def __init__(self, lm: TransformerLM, cache: KVCache):
        super().__init__()
        for i, m in enumerate(fbgemm_layers(lm)):
            setattr(self, f"fbgemm_{i}", m.packed)
        self.parts = (lm, cache)

    def forward(self, tokens: Tensor, state: tuple[Tensor, ...], at: Tensor, keys: Tensor, values: Tensor,
                *bias: Tensor) -> Tensor:
        return step_arithmetic(*self.parts, tokens, at, keys, values, *bias)


def fbgemm_layers(lm: TransformerLM) -> list[PackedLinear]:
    return [m for m in lm.modules() if isinstance(m, PackedLinear)]


RECORDINGS: weakref.WeakKeyDictionary[TransformerLM, dict[tuple, torch.jit.ScriptModule]] = weakref.WeakKeyDictionary()
RECORDING = threading.Lock()  # one recording at a time: making one switches the LM's requires_grad off and on


def recordable(lm: TransformerLM, cache: KVCache, steps_ahead: int) -> bool:
    """Whether recording the step is wanted (`lm.record_steps`), pays and can be done: a small model (its
    step is overhead, not weight reads) on the CPU, many steps ahead, its Linear layers fbgemm's fp16 /
    int8 ones (oneDNN's packed fp32 product takes an argument that a recording cannot hold)."""
    if not lm.record_steps or lm.training or lm.device.type != "cpu" or cache.embed_table is None:
        return False
    if steps_ahead < RECORD_MIN_STEPS:
        return False
    return not any(isinstance(m, nn.Linear) for m in lm.modules())


def recorded_step(lm: TransformerLM, cache: KVCache) -> torch.jit.ScriptModule:
    """The recording for the cache's layout, made on first need. Making it runs the step once on the
    next slot with placeholder tokens; the real step writes that slot again before anything reads it."""
    layout = (cache.num_rows, cache.attending, cache.independent_rows, cache.lag is None, cache.cross_bias is None,
              tuple(id(m.packed) for m in fbgemm_layers(lm)))  # the recording holds those, so their ids stay theirs
    with RECORDING:
        recordings = RECORDINGS.setdefault(lm, {})
        if layout not in recordings:
            recordings[layout] = record(lm, cache)
        return recordings[layout]


def record(lm: TransformerLM, cache: KVCache) -> torch.jit.ScriptModule:
    """`torch.jit.trace` of the cache's step, the LM's parameters held as constants (see `StepGraph`)."""
    tokens = torch.full((cache.num_rows, lm.cfg.num_codebooks), lm.cfg.special_token, device=lm.device)
    frozen = [p for p in lm.parameters() if p.requires_grad]  # (no nn.Linear to unpack: see `recordable`)
    for p in frozen:  # constants of a recording must not require grad; they are the same tensors all the same
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes the step never varies are fixed
            # torch suggests torch.compile or torch.export instead: the one rewrites the arithmetic (other
            # bits), the other replays in Python (the cost this removes)
            warnings.simplefilter("ignore", DeprecationWarning)
            inputs = (tokens, cache_tensors(cache), *step_inputs(lm, cache))
            return torch.jit.trace(StepGraph(lm, cache), inputs, check_trace=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
