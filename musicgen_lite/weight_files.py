"""Reading safetensors checkpoints memory-mapped, checked, one tensor at a time, into tensors that exist.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the tensors'
bytes. `SafetensorsFile` maps the file and checks the whole header against the file's size before
anything is read, so a truncated, emptied or garbled file is refused with one line naming it.
`view` hands out a tensor as it lies in the mapping, with no copy: its pages are read at first use
and stay clean file pages, which the kernel can drop and read again (a model that is loaded but not
used yet holds next to nothing, as with transformers). `read_into` copies one tensor straight into
its destination instead (another dtype, say), and then gives back the pages it read (`release`); a view
that has been copied into another form (a fused or packed weight) gives its pages back the same way.
The mapping is private copy-on-write: a weight changed in place (fine-tuning) never reaches the file.

`WeightFiles` is a checkpoint directory's weights: `model.safetensors`, or the shards listed by
`model.safetensors.index.json`, as one name -> tensor mapping.
"""

from __future__ import annotations

import json
import mmap
import struct
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000  # the format's own limit
_MAPPINGS: list[tuple[int, int, weakref.ref]] = []  # (address, bytes, the mmap) of each file views were taken from


class CorruptFile(ValueError):
    """A weights file that cannot be what it claims to be (truncated, garbled, emptied)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is corrupt: {why}")


class SafetensorsFile:
    """One .safetensors file: its header checked against the file, its tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 8:
                raise CorruptFile(self.path, f"{size} bytes, shorter than the 8-byte header length")
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            if header_bytes > min(MAX_HEADER_BYTES, size - 8):
                raise CorruptFile(self.path, f"its header claims {header_bytes} bytes of a {size}-byte file")
            self.entries = _parse_header(self.path, f.read(header_bytes))
            self.start = 8 + header_bytes  # where the tensors' bytes begin
            end = max((e[2][1] for e in self.entries.values()), default=0)
            if self.start + end != size:
                raise CorruptFile(self.path, f"the header describes {self.start + end} bytes, the file has {size}")
            # a private, copy-on-write mapping: writable for torch.frombuffer, never written back
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if end else None
            self._viewed = False  # whether views share the mapping (then the last of them unmaps it)
        if self._map is not None:  # where `release` finds it
            _MAPPINGS[:] = [m for m in _MAPPINGS if m[2]() is not None]
            address = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()
            _MAPPINGS.append((address, len(self._map), weakref.ref(self._map)))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def _flat(self, name: str) -> Tensor:
        """The bytes of tensor `name` in the mapping, as a flat tensor of its dtype (not empty)."""
        dtype, _, (begin, end) = self.entries[name]
        return torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.start + begin)

    def view(self, name: str) -> Tensor:
        """Tensor `name` in the file's dtype, sharing the mapping's memory (nothing is read until it is used)."""
        dtype, shape, (begin, end) = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        self._viewed = True
        return self._flat(name).view(shape)

    def read_into(self, name: str, out: Tensor) -> None:
        """Copy tensor `name` into `out` (same shape; any dtype), then release the pages it was read from."""
        _, shape, (begin, end) = self.entries[name]
        if tuple(out.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name} has shape {list(shape)}, expected {list(out.shape)}")
        if begin == end:
            return
        source = self._flat(name)
        with torch.no_grad():
            out.copy_(source.view(shape))
        release(source)

    def tensor(self, name: str) -> Tensor:
        """A fresh tensor holding `name`, in the file's dtype."""
        dtype, shape, _ = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        """Unmap the file, or, while views of it are in use, leave that to the last of them."""
        if self._map is not None and not self._viewed:
            self._map.close()
        self._map = None  # views keep the mmap object alive; it is unmapped when the last one is freed


def release(tensor: Tensor) -> None:
    """Let the kernel drop the pages under `tensor` if it views a mapped checkpoint: for a weight that has
    just been copied into another form and is being dropped. Only pages wholly inside it are dropped, so
    no neighbouring tensor loses a change made in place; anything else is left alone."""
    if not hasattr(mmap, "MADV_DONTNEED") or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for address, size, mapping in _MAPPINGS:
        m = mapping()
        if m is not None and not m.closed and address <= start and end <= address + size:
            page = mmap.PAGESIZE
            first, last = -(-(start - address) // page) * page, (end - address) // page * page
            if last > first:
                m.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def _parse_header(path: Path, raw: bytes) -> dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]]:
    """name -> (dtype, shape, (begin, end)), every field checked, the tensors' byte ranges disjoint."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptFile(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptFile(path, "its header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (*shape, begin, end)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CorruptFile(path, f"the header entry of {name!r} is malformed") from None
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * dtype.itemsize:
            raise CorruptFile(path, f"tensor {name!r} of shape {list(shape)} spans {end - begin} bytes")
        entries[name] = (dtype, shape, (begin, end))
    position = 0
    for name, (_, _, (begin, end)) in sorted(entries.items(), key=lambda e: e[1][2]):
        if begin != position:
            raise CorruptFile(path, f"the bytes of tensor {name!r} do not follow the previous tensor's")
        position = end
    return entries


class WeightFiles:
    """The weights of a checkpoint directory (one file or index + shards): name -> tensor, read on demand."""

    def __init__(self, directory: str | Path, single: str = SINGLE_FILE, index: str = INDEX_FILE):
        directory = Path(directory)
        self.directory = directory
        weight_map = None
        if (directory / single).is_file():
            shards = [single]
        elif (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise CorruptFile(directory / index, "it is not a safetensors index (a JSON weight_map)") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ValueError(f"{directory} is not a complete model directory: shard {missing[0]} is missing")
        else:
            raise ValueError(f"{directory} is not a complete model directory: no {single} or {index}")
        self._files = [SafetensorsFile(directory / shard) for shard in shards]
        self._where = {name: file for file in self._files for name in file.entries}
        absent = [name for name in weight_map or () if name not in self._where]
        if absent:
            raise CorruptFile(directory / weight_map[absent[0]], f"tensor {absent[0]!r} of the index is not in it")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise ValueError(f"{self.directory} is not a complete model directory: it has no tensor {name}")
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def read_into(self, name: str, out: Tensor) -> None:
        self._file(name).read_into(name, out)

    def tensor(self, name: str) -> Tensor:
        return self._file(name).tensor(name)

    def view(self, name: str) -> Tensor:
        return self._file(name).view(name)

    def state_dict(self, prefix: str, copy: bool = True) -> dict[str, Tensor]:
        """Every tensor whose name starts with `prefix`, the prefix stripped: fresh tensors, or with
        `copy=False` views of the mapped files (for a model that adopts them as its weights)."""
        take = self.tensor if copy else self.view
        return {name[len(prefix):]: take(name) for name in self._where if name.startswith(prefix)}

    def fill(self, module: nn.Module, sources: dict[str, list[str]]) -> None:
        """Give every parameter and buffer of `module` its values: `sources[name]` lists the tensors that,
        concatenated along the first dimension, make it (q/k/v into one fused weight, say). A module built
        on the meta device adopts the file's tensors where their dtype is its own: a weight made of one
        tensor becomes a view of the mapping, a Linear weight made of several is stacked at its first use
        (`packing.defer`); the rest is copied into storage made here."""
        from .packing import defer  # here: packing imports this module's `release`

        built_empty = any(t.is_meta for t in module.state_dict().values())
        if built_empty:
            module.to_empty(device="cpu")
            stray = [  # what a module built on meta holds outside its state_dict would stay meta, or garbage
                f"{prefix}.{name}".lstrip(".")
                for prefix, m in module.named_modules()
                for name in [*m._non_persistent_buffers_set,
                             *(n for n, v in vars(m).items() if isinstance(v, Tensor) and v.is_meta and v.numel())]
            ]
            if stray:
                raise AssertionError(f"{type(module).__name__}.{stray[0]} is not in its state_dict; it cannot be built empty")
        for name, target in module.state_dict(keep_vars=True).items():
            parts = sources[name]
            rows = [self.shape(part)[0] if self.shape(part) else 1 for part in parts]
            if sum(rows) != (target.shape[0] if target.dim() else 1):
                shapes = ", ".join(f"{p} {list(self.shape(p))}" for p in parts)
                raise ValueError(f"{self.directory}: {shapes} cannot make {name} of shape {list(target.shape)}")
            if built_empty and all(self._file(p).entries[p][0] == target.dtype for p in parts):
                if len(parts) == 1 and self.shape(parts[0]) == tuple(target.shape):
                    target.data = self.view(parts[0])
                    continue
                owner, _, attr = name.rpartition(".")
                linear = module.get_submodule(owner) if owner else module
                if isinstance(linear, nn.Linear) and attr == "weight" and all(len(self.shape(p)) == 2 for p in parts):
                    defer(linear, [self.view(p) for p in parts])
                    continue
            offset = 0
            for part, n in zip(parts, rows):
                self.read_into(part, target.data[offset : offset + n] if len(parts) > 1 else target.data)
                offset += n

    def close(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
