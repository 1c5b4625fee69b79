"""Streaming access to safetensors files: zero-copy reads and a tensor-at-a-time writer.

``safetensors.torch.load_file`` copies every tensor into freshly allocated memory and
``save_file`` needs every output tensor in memory at once. A one-off merge of n models then
holds n + 2 whole models, and on the target VMs first touching fresh memory (< 1 GB/s) cost more
than the merge itself. Here a file's tensors are views of a copy-on-write ``mmap`` (page-cache
pages, nothing copied, never written back), and the writer takes tensors one by one after a
header computed up front. The format is the documented one: an 8-byte little-endian header
length, a JSON header (dtype, shape, data_offsets per tensor, optional ``__metadata__``),
padded with spaces to a multiple of 8, then the raw little-endian bytes.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from evo.core.errors import EvoError

# the safetensors header's dtype codes (not evo's dtype names: evo.core.tensors.DTYPES)
HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
CODES = {v: k for k, v in HEADER_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # as the safetensors library: a larger header is a corrupt file


class TensorInfo:
    """Name-independent facts about one stored tensor (what shape checks need)."""

    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int):
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One ``.safetensors`` file opened for zero-copy reads. Raises EvoError naming the file
    when the header is malformed or points outside the file."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = self.path.stat().st_size
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(fh.read(n))
                if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
                    raise ValueError("header is not a JSON object of tensor entries")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise EvoError(f"{self.path}: cannot read safetensors ({err})") from None
        header.pop("__metadata__", None)
        self.tensors: dict[str, TensorInfo] = {}
        data = 8 + n
        for name, spec in header.items():
            try:
                dtype = HEADER_DTYPES[spec["dtype"]]
                shape = tuple(int(d) for d in spec["shape"])
                start, end = (data + int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise EvoError(f"{self.path}: cannot read safetensors (tensor {name}: bad header entry "
                               f"{json.dumps(spec)[:120]})") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end - start != math.prod(shape) * itemsize or start < data or end > size:
                raise EvoError(f"{self.path}: cannot read safetensors (tensor {name}: data offsets do not "
                               f"match its shape or lie outside the file)")
            self.tensors[name] = TensorInfo(dtype, shape, start, end)

    def tensor(self, name: str) -> Tensor:
        """A view of the stored tensor (copy-on-write pages: writing to it never reaches the file)."""
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(self._mm, dtype=info.dtype, count=info.numel, offset=info.start).view(info.shape)


def check_finite(t: Tensor, where: str, name: str) -> None:
    """EvoError when a floating tensor holds NaN or inf. A sum is one read-only pass and is finite
    whenever every entry is; only a non-finite sum (or an overflowing one) needs the exact test."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if math.isfinite(t.sum(dtype=torch.float64).item()):
        return
    if not bool(torch.isfinite(t).all()):
        raise EvoError(f"{where}: tensor {name} contains NaN or inf")


class SafetensorsWriter:
    """Writes one file tensor by tensor, in the order of ``specs`` ``(name, dtype, shape)``.
    Every declared tensor must be written exactly once, in order; ``close`` checks that."""

    def __init__(self, path, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, t: Tensor) -> None:
        expected, nbytes = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"safetensors writer: expected tensor {expected}, got {name}")
        t = t.detach().contiguous().cpu()
        if t.numel() * t.element_size() != nbytes:
            raise RuntimeError(f"safetensors writer: tensor {name} has {t.numel() * t.element_size()} bytes, "
                               f"the header declared {nbytes}")
        if nbytes:
            self._fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._order):
            raise RuntimeError(f"safetensors writer: {len(self._order) - self._next} declared tensors not written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def open_model_files(files: Iterable[Path]) -> dict[str, tuple[SafetensorsFile, TensorInfo]]:
    """Every tensor of a (possibly sharded) model: name -> (its file, its info)."""
    out = {}
    for f in files:
        st = SafetensorsFile(f)
        for name, info in st.tensors.items():
            out[name] = (st, info)
    return out
