"""Tensors that live on disk until a pass asks for them.

A model too big to hold twice (the user's copy and the captured one) is captured with
fake parameters (no data). Each stored tensor of the Graph is then a *lazy* meta tensor: it has a shape and a dtype, so capture, selection and size accounting work
on it, and a :class:`Stored` record saying which bytes of which file hold its data.
:func:`materialize` reads those bytes (``pread``, not ``mmap``: mapped file pages would count
against resident memory for as long as the mapping lives).

Two kinds of file hold the bytes:

* a safetensors checkpoint (:class:`Safetensors`, sharded or not): the user's weights;
* a :class:`SpillStore`: what passes produce while streaming, appended to one data file
  as each layer finishes, so a run's peak memory is about one layer's tensors.

Both keep their tensors as raw little-endian bytes at known offsets, which is also what
ONNX external data is.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ALIGN = 64  # spill offsets, so a tensor read back is aligned for any dtype


@dataclass
class ReadCounter:
    """How many tensors (and bytes) were read from a file set: tests check laziness with it."""

    tensors: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are: ``nbytes`` at ``offset`` of ``path``."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    counter: ReadCounter = field(compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)

    def read(self) -> torch.Tensor:
        buffer = bytearray(self.nbytes)
        with open(self.path, "rb", buffering=0) as f:
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = os.preadv(f.fileno(), [view[done:]], self.offset + done)
                if got == 0:
                    raise OSError(f"{self.path}: ends before the {self.nbytes} bytes at {self.offset}")
                done += got
        self.counter.tensors += 1
        self.counter.bytes += len(buffer)
        if not buffer:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(self.shape)


def lazy(stored: Stored, parameter: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A meta tensor standing for ``stored`` (a Parameter if ``parameter``), read as ``dtype`` if given (a bf16
    checkpoint captured in float32: each tensor converted as it is read)."""
    meta = torch.empty(stored.shape, dtype=dtype or stored.dtype, device="meta")
    if parameter:
        meta = torch.nn.Parameter(meta, requires_grad=meta.is_floating_point())
    meta._graphpress_stored = stored
    return meta


def stored_of(tensor: torch.Tensor) -> Stored | None:
    return getattr(tensor, "_graphpress_stored", None)


def is_lazy(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and stored_of(tensor) is not None


def materialize(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's data: read from disk if it is lazy, else the tensor itself."""
    stored = stored_of(tensor)
    if stored is None:
        return tensor
    value = stored.read()
    if value.dtype != tensor.dtype:
        value = value.to(tensor.dtype)
    return torch.nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else value


class Safetensors:
    """The tensors of a checkpoint folder's safetensors files (``model.safetensors`` or shards named by
    ``model.safetensors.index.json``), by name; only the headers are read here."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.counter = ReadCounter()
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory}: no safetensors files")
        self.entries: dict[str, Stored] = {}
        for name in files:
            self.entries.update(self._header(self.directory / name))

    def _header(self, path: Path) -> dict[str, Stored]:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        found = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which graphpress cannot read")
            begin = info["data_offsets"][0]
            found[key] = Stored(path, 8 + length + begin, DTYPES[info["dtype"]], tuple(info["shape"]), self.counter)
        return found

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.entries.values())


class SpillStore:
    """An append-only file of tensors a streaming run produces; :meth:`put` returns a lazy stand-in.

    Tensors are written as they come (one layer's factors, one codebook) and dropped from
    memory; the file is deleted with the store's directory at the end of the run.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / "spill.bin"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self.counter = ReadCounter()
        self.size = 0

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        value = tensor.detach().contiguous()
        data = _raw(value)
        offset = -(-self.size // ALIGN) * ALIGN
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self.size = offset + len(data)
        stored = Stored(self.path, offset, value.dtype, tuple(value.shape), self.counter)
        return lazy(stored, parameter=isinstance(tensor, torch.nn.Parameter))


def write_safetensors(path: Path, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], value_of) -> None:
    """Write a safetensors file holding ``shapes`` (name -> (dtype, shape)), asking ``value_of(name)`` for one
    tensor at a time: the header goes first, so memory holds one tensor, never the file. Atomic."""
    names = {dtype: key for key, dtype in DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in shapes.items():
        nbytes = _nbytes(dtype, shape)
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    staged = Path(path).with_name(f".{Path(path).name}.partial")
    try:
        with open(staged, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for name, (dtype, shape) in shapes.items():
                value = value_of(name).detach().to(dtype).contiguous()
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(f"{name}: value has shape {tuple(value.shape)}, the header says {tuple(shape)}")
                f.write(_raw(value))
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _raw(value: torch.Tensor) -> bytes:
    """A contiguous tensor's bytes as stored (little-endian, row-major): what safetensors and the spill hold."""
    return value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
