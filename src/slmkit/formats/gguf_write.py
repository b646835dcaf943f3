"""Write GGUF files (version 3), streaming: the header first, then each tensor's bytes as it is made.

The layout is the one ``gguf.GGUFFile`` reads (see its module docstring): header, metadata, tensor infos
(ggml dimension order, type, offset within the data section), padding to ``general.alignment``, data with
every tensor padded to the alignment. Because every tensor's size follows from its shape and type, the
header is written before any tensor is computed, so a large model is never held in memory whole.

The file is written under a temporary name and renamed when complete: a failure leaves no partial file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import SlmError
from .gguf import DEFAULT_ALIGNMENT, GGUF_MAGIC
from .gguf_quantize import TYPE_IDS, quantized_nbytes

VERSION = 3
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
            BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY = {UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8", UINT8: "<u1"}


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type (for an array: the type of its items)."""
    value: Any
    vtype: int


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # torch order
    type_name: str  # F32, F16, Q8_0, ...
    make: Callable[[], np.ndarray]  # returns the tensor's bytes (uint8), called once, in file order

    @property
    def nbytes(self) -> int:
        return quantized_nbytes(self.type_name, self.shape)


def _vtype_of(value: Any) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return UINT32 if 0 <= value < 2 ** 32 else INT64
    if isinstance(value, float):
        return FLOAT32
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple)):
        return ARRAY
    raise SlmError(f"GGUF metadata value {value!r} has an unsupported type {type(value).__name__}")


def _item_type(items: list) -> int:
    if all(isinstance(v, str) for v in items):
        return STRING
    if all(isinstance(v, bool) for v in items):
        return BOOL
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return INT32
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return FLOAT32
    raise SlmError("GGUF metadata arrays must hold strings, booleans or numbers of one kind")


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _scalar(value: Any, vtype: int) -> bytes:
    return _string(str(value)) if vtype == STRING else struct.pack(_FORMATS[vtype], value)


def _array(items: list, item_type: int) -> bytes:
    head = struct.pack("<IQ", item_type, len(items))
    if item_type == STRING:
        return head + b"".join(_string(s) for s in items)
    if item_type == BOOL:
        return head + bytes(bool(v) for v in items)
    return head + np.asarray(items, dtype=_NUMPY[item_type]).tobytes()


def _metadata_bytes(key: str, value: Any) -> bytes:
    """One key/value pair; a ``Typed`` value names its GGUF type (for a list: the type of its items)."""
    if isinstance(value, Typed):
        raw, vtype = value.value, value.vtype
    else:
        raw = value
        vtype = _vtype_of(value)
        if vtype == ARRAY:
            vtype = _item_type(list(value))
    if isinstance(raw, (list, tuple)):
        return _string(key) + struct.pack("<I", ARRAY) + _array(list(raw), vtype)
    return _string(key) + struct.pack("<I", vtype) + _scalar(raw, vtype)


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def write_gguf(path: str | Path, metadata: dict[str, Any], tensors: Iterable[TensorEntry],
               progress: Callable[[TensorEntry], None] | None = None) -> Path:
    """Write ``metadata`` and ``tensors`` to ``path``; returns the path. Nothing is left behind on failure."""
    path = Path(path)
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise SlmError("GGUF tensor names must be unique")
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", VERSION, len(tensors), len(metadata)))
    for key, value in metadata.items():
        header += _metadata_bytes(key, value)
    offset = 0
    for t in tensors:
        ne = tuple(reversed([int(s) for s in t.shape])) or (1,)
        header += _string(t.name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        header += struct.pack("<IQ", TYPE_IDS[t.type_name], offset)
        offset += t.nbytes + _pad(t.nbytes, alignment)
    header += bytes(_pad(len(header), alignment))

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(header)
            for t in tensors:
                data = np.ascontiguousarray(t.make()).view(np.uint8).reshape(-1)
                if data.nbytes != t.nbytes:
                    raise SlmError(f"tensor {t.name}: {data.nbytes} bytes made, {t.nbytes} expected for "
                                   f"{t.type_name} {t.shape}")
                f.write(data.tobytes())
                f.write(bytes(_pad(t.nbytes, alignment)))
                if progress is not None:
                    progress(t)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
