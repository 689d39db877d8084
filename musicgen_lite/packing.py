"""Decoding-step weights moved into oneDNN's blocked layout, in place of the plain ones, not beside them.

A decoding step multiplies a few rows with every weight. BLAS re-packs a weight for such a product at
every call, reading it more than once; oneDNN's blocked layout is streamed once. `pack(linear, rows)`
reorders an nn.Linear's weight into that layout and frees the plain tensor: the model then holds one
copy of its weights, as it did before generating. The Parameter object stays, its data an empty
placeholder, so optimizers and other references to it keep working.

Every other use of the weight (reading `linear.weight`, a plain forward pass, `state_dict()`,
`named_parameters()`, `.to()`, `load_state_dict()`, a copy or a pickle) goes through the module's
parameter dict, which unpacks it first: the reorder is exact, so the plain weight comes back bit for
bit, and the next `pack` makes a fresh blocked copy of whatever the weight has become.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PackingParameters(dict):
    """An nn.Linear's `_parameters` that restores its packed weight before handing any parameter out."""

    packed: Tensor | None = None  # the weight in oneDNN's layout, while the plain one is freed

    def unpack(self) -> None:
        if self.packed is not None:
            weight = dict.__getitem__(self, "weight")
            weight.data = self.packed.to_dense()
            self.packed = None

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
            self.packed = None  # a new weight replaces the packed one
        dict.__setitem__(self, name, value)

    def __delitem__(self, name: str) -> None:
        if name == "weight":
            self.packed = None
        dict.__delitem__(self, name)

    def __reduce__(self):  # a copy or a pickle holds the plain weights
        return PackingParameters, (dict(self.items()),)


def pack(linear: nn.Linear, rows: int) -> Tensor:
    """The weight of `linear` in oneDNN's layout for `rows`-row products, made on first use and kept
    until anything else uses the weight; the plain weight is freed meanwhile."""
    params = linear.__dict__["_parameters"]
    if not isinstance(params, PackingParameters):
        params = linear.__dict__["_parameters"] = PackingParameters(params)
    if params.packed is None:
        weight = dict.__getitem__(params, "weight")
        params.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    return params.packed


def packed_weight(linear: nn.Linear) -> Tensor | None:
    """The packed weight of `linear`, or None while it holds its plain weight."""
    params = linear.__dict__["_parameters"]
    return params.packed if isinstance(params, PackingParameters) else None
