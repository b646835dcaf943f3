"""GGML tensor types: block sizes, and dequantization of every type slmkit reads.

The bit layouts are those of llama.cpp's ``ggml-quants.c`` (and gguf-py's ``quants.py``). Every
quantized type stores its values in fixed-size blocks that run along the tensor's last torch
dimension (ggml's ``ne0``); each ``_deq_*`` function below turns a ``(n_blocks, type_size)``
uint8 tensor into a ``(n_blocks, block_size)`` float32 tensor, vectorised over all blocks at
once. Arithmetic is done in float32 in the same order as the reference, so the results match it
bit for bit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ModelFileError, UnsupportedError


@dataclass(frozen=True)
class QuantType:
    name: str
    block_size: int  # values per block
    type_size: int  # bytes per block


GGML_TYPES: dict[int, QuantType] = {
    0: QuantType("F32", 1, 4),
    1: QuantType("F16", 1, 2),
    2: QuantType("Q4_0", 32, 18),
    3: QuantType("Q4_1", 32, 20),
    6: QuantType("Q5_0", 32, 22),
    7: QuantType("Q5_1", 32, 24),
    8: QuantType("Q8_0", 32, 34),
    10: QuantType("Q2_K", 256, 84),
    11: QuantType("Q3_K", 256, 110),
    12: QuantType("Q4_K", 256, 144),
    13: QuantType("Q5_K", 256, 176),
    14: QuantType("Q6_K", 256, 210),
    30: QuantType("BF16", 1, 2),
}


# --- helpers -------------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian f16 field at byte ``offset`` of every block, as float32 (n_blocks, 1)."""
    # Every block size and f16 offset is even, so the blocks can be viewed as rows of halves.
    return blocks.view(torch.float16)[:, offset // 2:offset // 2 + 1].float()


def _fields(x: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Split each byte of ``x`` (..., k) into ``count`` bit fields of ``width`` bits, lowest first.

    Returns (..., count, k): ``out[..., i, j] = (x[..., j] >> (i * width)) & mask``.
    """
    # Shifts by a Python int (not a broadcast tensor) and a contiguous input keep torch on its
    # vectorised kernels; the loop is over the <= 8 fields of a byte, not over blocks.
    x = x.contiguous()
    mask = (1 << width) - 1
    return torch.stack([(x >> (i * width)) & mask for i in range(count)], dim=-2)


def _low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed nibbles -> (n, 32): low nibbles are values 0..15, high nibbles 16..31."""
    return _fields(qs, 4, 2).reshape(qs.shape[0], 32)


def _qh_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian u32 -> (n, 32): bit j of the u32 (byte j // 8, bit j % 8) for value j."""
    return _fields(qh, 1, 8).transpose(1, 2).reshape(qh.shape[0], 32)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 scale bytes into 8 six-bit scales and 8 six-bit mins, as float32.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 hold
    mins 0-3 (low 6 bits) and the top 2 bits of mins 4-7; bytes 8-11 hold the low 4 bits of
    scales 4-7 (low nibble) and of mins 4-7 (high nibble).
    """
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


# --- one function per type family ----------------------------------------------------------


def _deq_f32(blocks: torch.Tensor) -> torch.Tensor:
    # F32: 4 little-endian bytes per value. Clone first: the result must not alias the input.
    return blocks.clone().view(torch.float32)


def _deq_f16(blocks: torch.Tensor) -> torch.Tensor:
    # F16: 2 bytes per value, IEEE half.
    return blocks.view(torch.float16).float()


def _deq_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # BF16: 2 bytes per value, the top half of an IEEE float32.
    return blocks.view(torch.bfloat16).float()


def _deq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # Q8_0 (34 bytes / 32 values): f16 d, int8 q[32]; x = d * q.
    d = _f16(blocks, 0)
    return blocks[:, 2:].view(torch.int8).float().mul_(d)


def _deq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # Q4_0 (18 bytes / 32 values): f16 d, 16 bytes of nibbles (low nibble j -> value j,
    # high nibble j -> value j + 16); x = d * (q - 8).
    d = _f16(blocks, 0)
    q = _low_high_nibbles(blocks[:, 2:18]).to(torch.int8) - 8
    return q.float().mul_(d)


def _deq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # Q4_1 (20 bytes / 32 values): f16 d, f16 m, nibbles as in Q4_0; x = d * q + m.
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return _low_high_nibbles(blocks[:, 4:20]).float().mul_(d).add_(m)


def _deq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # Q5_0 (22 bytes / 32 values): f16 d, u32 qh (bit j = 5th bit of value j), nibbles as in
    # Q4_0; x = d * (q - 16).
    d = _f16(blocks, 0)
    q = _low_high_nibbles(blocks[:, 6:22]) | (_qh_bits(blocks[:, 2:6]) << 4)
    return (q.to(torch.int8) - 16).float().mul_(d)


def _deq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # Q5_1 (24 bytes / 32 values): f16 d, f16 m, u32 qh, nibbles as in Q5_0; x = d * q + m.
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _low_high_nibbles(blocks[:, 8:24]) | (_qh_bits(blocks[:, 4:8]) << 4)
    return q.float().mul_(d).add_(m)


def _deq_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # Q2_K (84 bytes / 256 values): scales[16] (per 16 values: low nibble scale, high nibble
    # min), qs[64] (two halves of 32 bytes; in each half, bits 2i..2i+1 of byte j are value
    # 32i + j of that half's 128), f16 d, f16 dmin; x = d * scale * q - dmin * min.
    n = blocks.shape[0]
    sc = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (sc & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (sc >> 4).float()).view(n, 16, 1)
    q = _fields(blocks[:, 16:80].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).view(n, 256)


def _deq_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # Q3_K (110 bytes / 256 values): hmask[32] (bit i of byte j: high bit of value 32i + j),
    # qs[64] (low 2 bits, packed as in Q2_K), scales[12] (16 six-bit scales: low nibbles in
    # bytes 0-7, scales 0-7 then 8-15; top 2 bits in bytes 8-11, 2 bits each), f16 d;
    # x = d * (scale - 32) * (q_low - (4 if the high bit is clear else 0)).
    n = blocks.shape[0]
    scales = blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = _fields(scales[:, 0:8], 4, 2).reshape(n, 16)
    high = _fields(scales[:, 8:12], 2, 4).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).view(n, 16, 1)
    ql = _fields(blocks[:, 32:96].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    qh = _fields(blocks[:, 0:32], 1, 8).reshape(n, 16, 16)
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()
    return q.mul_(dl).view(n, 256)


def _deq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # Q4_K (144 bytes / 256 values): f16 d, f16 dmin, scales[12] (8 six-bit scales and mins,
    # see _k_scales_mins), qs[128] (four 32-byte chunks; low nibbles are 32 values, high
    # nibbles the next 32); x = d * scale * q - dmin * min, per 32 values.
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    dl = (d * sc).view(n, 8, 1)
    ml = (dmin * mn).view(n, 8, 1)
    q = _fields(blocks[:, 16:144].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32).float()
    return q.mul_(dl).sub_(ml).view(n, 256)


def _deq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # Q5_K (176 bytes / 256 values): as Q4_K, plus qh[32] before qs[128] (bit i of byte j:
    # 5th bit of value 32i + j); x = d * scale * q - dmin * min, per 32 values.
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    dl = (d * sc).view(n, 8, 1)
    ml = (dmin * mn).view(n, 8, 1)
    ql = _fields(blocks[:, 48:176].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    qh = _fields(blocks[:, 16:48], 1, 8)
    q = (ql | (qh << 4)).float()
    return q.mul_(dl).sub_(ml).view(n, 256)


def _deq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # Q6_K (210 bytes / 256 values): ql[128] (low 4 bits; two halves of 64 bytes, low nibbles
    # are 64 values, high nibbles the next 64), qh[64] (top 2 bits; two halves of 32 bytes,
    # bits 2i..2i+1 of byte j go to value 32i + j of that half), int8 scales[16] (one per 16
    # values), f16 d; x = d * scale * (q - 32).
    n = blocks.shape[0]
    d = _f16(blocks, 208)
    sc = blocks[:, 192:208].view(torch.int8).float()
    dl = (d * sc).view(n, 16, 1)
    ql = _fields(blocks[:, 0:128].reshape(n, 2, 64), 4, 2).reshape(n, 8, 32)
    qh = _fields(blocks[:, 128:192].reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).float().view(n, 16, 16)
    return q.mul_(dl).view(n, 256)


_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: _deq_f32,
    1: _deq_f16,
    30: _deq_bf16,
    8: _deq_q8_0,
    2: _deq_q4_0,
    3: _deq_q4_1,
    6: _deq_q5_0,
    7: _deq_q5_1,
    10: _deq_q2_k,
    11: _deq_q3_k,
    12: _deq_q4_k,
    13: _deq_q5_k,
    14: _deq_q6_k,
}


def _type_name(ggml_type: int) -> str:
    if ggml_type in GGML_TYPES:
        return GGML_TYPES[ggml_type].name
    try:
        from gguf import GGMLQuantizationType

        return f"{GGMLQuantizationType(ggml_type).name} ({ggml_type})"
    except (ImportError, ValueError):
        return f"id {ggml_type}"


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize one tensor's raw GGUF bytes to a contiguous float32 tensor of torch ``shape``.

    ``raw`` is never written to (it may be a read-only memory map); the result never shares
    memory with it. ``shape[-1]`` is ggml's ``ne0``, the dimension the quant blocks run along.
    """
    deq = _DEQUANTIZERS.get(ggml_type)
    if deq is None:
        supported = ", ".join(GGML_TYPES[t].name for t in _DEQUANTIZERS)
        raise UnsupportedError(
            f"ggml type {_type_name(ggml_type)} is not supported; slmkit reads {supported}"
        )
    qt = GGML_TYPES[ggml_type]
    shape = tuple(int(s) for s in shape)
    ne0 = shape[-1] if shape else 1
    if ne0 % qt.block_size != 0:
        raise ModelFileError(
            f"{qt.name} tensor of shape {shape}: last dimension {ne0} is not a multiple of "
            f"the block size {qt.block_size}"
        )
    n_blocks = math.prod(shape) // qt.block_size
    expected = n_blocks * qt.type_size
    actual = raw.nbytes
    if actual != expected:
        raise ModelFileError(
            f"{qt.name} tensor of shape {shape} needs {expected} bytes, got {actual}"
        )

    flat = np.asarray(raw)
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    flat = flat.reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # A read-only memmap makes torch warn that writes would be undefined; nothing here writes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        blocks = torch.from_numpy(flat)
    if blocks.data_ptr() % 4:
        blocks = blocks.clone()  # keep wide views aligned on odd-offset buffers
    blocks = blocks.view(n_blocks, qt.type_size)
    return deq(blocks).reshape(shape).contiguous()
