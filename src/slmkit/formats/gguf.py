"""Read GGUF files (the llama.cpp format): header, metadata, tensor index, raw tensor bytes.

Layout (little-endian): magic ``GGUF``, version u32, tensor_count u64, kv_count u64, then
``kv_count`` key/value pairs, then ``tensor_count`` tensor infos (name, n_dims, ne[n_dims] in
ggml order -- the reverse of the torch shape --, ggml type, offset), padding to
``general.alignment`` (default 32), then the data section. Tensor data is memory-mapped, never
copied until a tensor is asked for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError, UnsupportedError
from .gguf_quants import GGML_TYPES, dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# value type id -> (struct format, size) for scalars
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY_SCALARS = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (reverse of ggml's ne)
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFileError(
                f"{self.path}: GGUF header is truncated or corrupt (needs byte {self.pos + n}, "
                f"file has {len(self.buf)})"
            )
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int):
        fmt, size = _SCALARS[vtype]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar(10)
        if n > len(self.buf):
            raise ModelFileError(f"{self.path}: corrupt GGUF string length {n} at byte {self.pos - 8}")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar(4), self.scalar(10)
            if count > len(self.buf):
                raise ModelFileError(f"{self.path}: corrupt GGUF array length {count}")
            if item_type in _NUMPY_SCALARS:
                dtype = np.dtype(_NUMPY_SCALARS[item_type]).newbyteorder("<")
                raw = self.take(count * dtype.itemsize)
                return np.frombuffer(raw, dtype=dtype).tolist()
            return [self.value(item_type) for _ in range(count)]
        raise ModelFileError(f"{self.path}: corrupt GGUF metadata value type {vtype} at byte {self.pos - 4}")


class GGUFFile:
    """An opened GGUF file: ``metadata`` (plain Python values), ``tensors`` (name -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if size < 24:
            raise ModelFileError(f"{self.path}: file is too small to be GGUF ({size} bytes)")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mmap), self.path)
        magic = bytes(cur.take(4))
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = cur.scalar(4)
        if self.version not in (2, 3):
            raise UnsupportedError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        if n_tensors > size or n_kv > size:
            raise ModelFileError(f"{self.path}: corrupt GGUF header (tensor count {n_tensors}, kv count {n_kv})")

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar(4))

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar(4)
            if n_dims > 8:
                raise ModelFileError(f"{self.path}: tensor {name!r} has a corrupt dimension count {n_dims}")
            ne = [cur.scalar(10) for _ in range(n_dims)]
            ggml_type, rel_offset = cur.scalar(4), cur.scalar(10)
            infos.append((name, ne, ggml_type, rel_offset))

        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, rel_offset in infos:
            qt = GGML_TYPES.get(ggml_type)
            if qt is None:
                raise UnsupportedError(
                    f"{self.path}: tensor {name!r} uses quantization type {_type_name(ggml_type)}, which slmkit "
                    f"cannot read (supported: {', '.join(t.name for t in GGML_TYPES.values())})"
                )
            n_values = int(np.prod(ne)) if ne else 1
            nbytes = n_values // qt.block_size * qt.type_size
            info = TensorInfo(name, tuple(reversed(ne)), ggml_type, data_start + rel_offset, nbytes)
            if info.offset + nbytes > size:
                raise ModelFileError(
                    f"{self.path}: file is truncated: tensor {name!r} needs bytes up to "
                    f"{info.offset + nbytes}, file has {size}"
                )
            self.tensors[name] = info
        # The header is parsed; tensor data is read on demand with plain file reads, so bytes that have
        # been dequantized are not kept resident (a memory map would count them in RSS while open).
        del cur
        self._mmap = None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str, first_row: int = 0, n_rows: int | None = None) -> np.ndarray:
        """The bytes of a tensor (or of rows ``first_row .. first_row + n_rows`` of a 2-D one) as uint8."""
        info = self.tensors[name]
        rows = info.shape[0] if len(info.shape) > 1 else 1
        row_bytes = info.nbytes // rows
        n_rows = rows - first_row if n_rows is None else n_rows
        count = n_rows * row_bytes
        data = np.fromfile(self.path, dtype=np.uint8, count=count, offset=info.offset + first_row * row_bytes)
        if data.size != count:
            raise ModelFileError(f"{self.path}: could not read tensor {name!r} (file changed or truncated)")
        return data

    def tensor(self, name: str):
        """The tensor dequantized to a float32 torch tensor of its torch shape."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape)

    def row_chunks(self, name: str, rows_per_chunk: int = 4096):
        """Yield a 2-D tensor dequantized ``rows_per_chunk`` rows at a time (bounded memory for big tables)."""
        info = self.tensors[name]
        for start in range(0, info.shape[0], rows_per_chunk):
            n = min(rows_per_chunk, info.shape[0] - start)
            yield dequantize(self.raw(name, start, n), info.ggml_type, (n, *info.shape[1:]))


def _type_name(ggml_type: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return f"{GGMLQuantizationType(ggml_type).name} ({ggml_type})"
    except (ImportError, ValueError):
        return f"id {ggml_type}"


def read_metadata(path: str | Path) -> dict[str, Any]:
    return GGUFFile(path).metadata
