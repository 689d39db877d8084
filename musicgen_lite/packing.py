"""Decoding-step weights moved into oneDNN's blocked layout, in place of the plain ones, not beside them.

A decoding step multiplies a few rows with every weight. BLAS re-packs a weight for such a product at
every call, reading it more than once; oneDNN's blocked layout is streamed once. `pack(linear, rows)`
reorders an nn.Linear's weight into that layout and frees the plain tensor: the model then holds one
copy of its weights, as it did before generating. The Parameter object stays, its data an empty
placeholder, so optimizers and other references to it keep working.

Every other use of the weight (reading `linear.weight`, a plain forward pass, `state_dict()`,
`named_parameters()`, `.to()`, `load_state_dict()`, a copy or a pickle) goes through the module's
parameter dict, which unpacks it first: the reorder is exact, so the plain weight comes back bit for
bit, and the next `pack` makes a fresh blocked copy of whatever the weight has become. `linear` runs a
layer through its packed weight; `PackedLinear` replaces a layer for the opt-in fp16 / int8 precisions.

A weight loaded from several checkpoint tensors (q, k and v into one) can wait as those tensors'
views of the mapped file (`defer`): it is stacked at its first use, or packed straight from them, and
their pages are then given back, so loading reads nothing and copies nothing.
"""

from __future__ import annotations

import ctypes
import warnings
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .weight_files import release

if TYPE_CHECKING:
    from .lm import KVCache


def linear(module: nn.Module, x: Tensor, cache: KVCache | None) -> Tensor:
    """module(x) for a bias-free linear layer, through the packed copy of its weight when the cache has one."""
    if cache is None:
        return module(x)
    packed = cache.packed.get(module)
    if packed is None:  # decoding: no hooks to run, so the module call's overhead is skipped
        return module.forward(x)
    if x.dim() == 2:  # [rows, in] already: no reshapes
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class PackingParameters(dict):
    """An nn.Linear's `_parameters` that restores its packed weight before handing any parameter out."""

    packed: Tensor | None = None  # the weight in oneDNN's layout, while the plain one is freed
    parts: list[Tensor] | None = None  # views that, stacked along the first dimension, are the weight, not read yet

    def unpack(self) -> None:
        if self.packed is not None:
            weight = dict.__getitem__(self, "weight")
            weight.data = self.packed.to_dense()
            self.packed = None
        elif self.parts is not None:
            dict.__getitem__(self, "weight").data = self.stacked()

    def stacked(self) -> Tensor:
        """The deferred weight, stacked from its parts, whose pages are then released."""
        parts, self.parts = self.parts, None
        weight = torch.cat(parts)
        for part in parts:
            release(part)
        return weight

    def __getitem__(self, name: str):
        self.unpack()
        return dict.__getitem__(self, name)

    def get(self, name: str, default=None):
        self.unpack()
        return dict.get(self, name, default)

    def items(self):
        self.unpack()
        return dict.items(self)

    def values(self):
        self.unpack()
        return dict.values(self)

    def __setitem__(self, name: str, value) -> None:
        if name == "weight":
            self.packed = self.parts = None  # a new weight replaces the packed or deferred one
        dict.__setitem__(self, name, value)

    def __delitem__(self, name: str) -> None:
        if name == "weight":
            self.packed = self.parts = None
        dict.__delitem__(self, name)

    def __reduce__(self):  # a copy or a pickle holds the plain weights
        return PackingParameters, (dict(self.items()),)


def _packing_parameters(linear: nn.Linear) -> PackingParameters:
    params = linear.__dict__["_parameters"]
    if not isinstance(params, PackingParameters):
        params = linear.__dict__["_parameters"] = PackingParameters(params)
    return params


def defer(linear: nn.Linear, parts: list[Tensor]) -> None:
    """Make the weight of `linear` the stack of `parts` (views of a mapped checkpoint), read at first use."""
    params = _packing_parameters(linear)
    weight = dict.__getitem__(params, "weight")
    if sum(p.shape[0] for p in parts) != weight.shape[0] or any(p.shape[1:] != weight.shape[1:] for p in parts):
        raise ValueError(f"{[list(p.shape) for p in parts]} do not stack into a weight of shape {list(weight.shape)}")
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    params.packed, params.parts = None, parts


def pack(linear: nn.Linear, rows: int) -> Tensor:
    """The weight of `linear` in oneDNN's layout for `rows`-row products, made on first use and kept
    until anything else uses the weight; the plain weight is freed meanwhile (a view of a mapped
    checkpoint gives its pages back)."""
    params = _packing_parameters(linear)
    if params.packed is None:
        weight = dict.__getitem__(params, "weight")
        plain = params.stacked() if params.parts is not None else weight.detach()
        params.packed = torch.ops.mkldnn._reorder_linear_weight(plain, rows)
        release(plain)
        weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    return params.packed


@cache
def _malloc_trim():
    libc = ctypes.CDLL(None)  # the C library the process runs on
    return getattr(libc, "malloc_trim", None)  # glibc only


def trim_heap() -> None:
    """Give the heap's free pages back to the system. Packing frees each plain weight (and the stacked
    copy of a deferred one) as it goes; glibc keeps such memory for reuse, and over a whole model it
    adds up (0.43 GiB of a 7 GiB one by the last weight), though no later step asks for it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def packed_weight(linear: nn.Linear) -> Tensor | None:
    """The packed weight of `linear`, or None while it holds its plain weight."""
    params = linear.__dict__["_parameters"]
    return params.packed if isinstance(params, PackingParameters) else None


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
        if x.dim() == 2:  # [rows, in] already (the decoding step's case): no reshapes
            return self.product(x)
        return self.product(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def product(self, flat: Tensor) -> Tensor:
        """[rows, in] -> [rows, out]."""
        if self.precision == "fp16":
            return torch.ops.quantized.linear_dynamic_fp16(flat, self.packed)
        return torch.ops.quantized.linear_dynamic(flat, self.packed, True)  # reduce_range: 7-bit activations, so that fbgemm's int16 pair sums cannot saturate

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.precision != "fp16":
            raise RuntimeError(f"an LM converted to {self.precision} is for inference only; save it before set_precision")
        destination[prefix + "weight"] = torch.ops.quantized.linear_unpack_fp16(self.packed)[0]  # the fp16 values, exactly
