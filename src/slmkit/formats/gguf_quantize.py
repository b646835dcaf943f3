"""Quantize float tensors into GGML block types: F32, F16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K.

Each quantizer follows llama.cpp's reference C code (``quantize_row_*_ref`` in ``ggml-quants.c``: the path
``llama-quantize`` takes without an importance matrix), vectorised over all blocks of a tensor in float32:

* Q8_0: per 32 values, d = max|x| / 127, q = round(x / d).
* Q4_0 / Q5_0: per 32 values, d = (the value of largest magnitude) / -8 (-16), q = trunc(x / d + 8.5 (16.5)).
* Q4_K: per 256 values, eight groups of 32 each fitted as x = s*q - m (q in 0..15) by ``make_qkx2_quants``'s
  weighted search over 21 scales; the eight scales and mins are then quantized to 6 bits against two f16 maxima.
* Q6_K: per 256 values, sixteen groups of 16 each fitted as x = s*q (q in -32..31) by ``make_qx_quants``'s
  search over 19 scales; the scales are quantized to int8 against one f16 maximum.

Rounding is the C code's: ``nearest_int`` rounds half to even, ``roundf`` half away from zero, casts
truncate. The C code adds its sums one value at a time, and the K searches compare candidates whose errors
are close, so the sums here are added in the same order (``_ordered_sum``), not by a torch reduction: the
bytes then equal llama-quantize's (``tests/test_gguf_export.py`` compares them). ``dequantize`` in
``gguf_quants`` reads every type written here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SlmError
from .gguf_quants import GGML_TYPES

TYPE_IDS = {qt.name: type_id for type_id, qt in GGML_TYPES.items()}
WRITABLE = ("F32", "F16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K")
GROUP_MAX_EPS = 1e-15  # llama.cpp: a group whose largest magnitude is below this is all zeros
ROWS_PER_CHUNK = 1024  # rows quantized at a time: bounds the float32 temporaries of a large table


def block_size(type_name: str) -> int:
    return GGML_TYPES[TYPE_IDS[type_name]].block_size


def quantized_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    qt = GGML_TYPES[TYPE_IDS[type_name]]
    n = 1
    for s in shape:
        n *= int(s)
    return n // qt.block_size * qt.type_size


def quantize(t: torch.Tensor, type_name: str) -> np.ndarray:
    """The bytes (uint8, C order) of ``t`` stored as ``type_name``; blocks run along the last dimension."""
    if type_name not in WRITABLE:
        raise SlmError(f"cannot write GGML type {type_name!r} (writable: {', '.join(WRITABLE)})")
    t = t.detach().to("cpu", torch.float32).contiguous()
    if type_name == "F32":
        return t.numpy().view(np.uint8).reshape(-1).copy()
    if type_name == "F16":
        return t.to(torch.float16).numpy().view(np.uint8).reshape(-1).copy()
    size = block_size(type_name)
    width = t.shape[-1] if t.dim() else 1
    if width % size:
        raise SlmError(f"{type_name} needs rows whose length is a multiple of {size}; got shape {tuple(t.shape)}")
    rows = t.reshape(-1, width)
    fn = _QUANTIZERS[type_name]
    parts = [fn(rows[i:i + ROWS_PER_CHUNK].reshape(-1, size)) for i in range(0, rows.shape[0], ROWS_PER_CHUNK)]
    return np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0, np.uint8)


# --------------------------------------------------------------------------------------- helpers
def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> the little-endian bytes of its float16 rounding, uint8 [n, 2]."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _f16_round(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).float()


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    whole = torch.trunc(v)
    return whole + torch.where((v - whole).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """Per row, the value of largest magnitude (the first such, as the C loop's strict comparison keeps)."""
    index = x.abs().argmax(dim=1, keepdim=True)
    return x.gather(1, index)[:, 0]


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _ordered_sum(t: torch.Tensor) -> torch.Tensor:
    """Row sums of a 2-D tensor added left to right in float32, as a C loop adds them (a torch reduction
    adds in another order, and a near tie between two candidate scales can then go the other way)."""
    total = t[:, 0].clone()
    for i in range(1, t.shape[1]):
        total += t[:, i]
    return total


def _pack_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return (low.to(torch.uint8) & 0x0F) | ((high.to(torch.uint8) & 0x0F) << 4)


# ------------------------------------------------------------------------------ 32-value types
def _q8_0(x: torch.Tensor) -> np.ndarray:
    d = x.abs().amax(dim=1) / 127
    q = _round_away(x * _safe_inverse(d)[:, None]).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=1).numpy()


def _q4_0(x: torch.Tensor) -> np.ndarray:
    d = _signed_max(x) / -8
    q = torch.clamp_max(torch.trunc(x * _safe_inverse(d)[:, None] + 8.5), 15)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q[:, :16], q[:, 16:])], dim=1).numpy()


def _q5_0(x: torch.Tensor) -> np.ndarray:
    d = _signed_max(x) / -16
    q = torch.clamp_max(torch.trunc(x * _safe_inverse(d)[:, None] + 16.5), 31).to(torch.int64)
    fifth = (q >> 4) & 1  # bit j of qh is the 5th bit of value j
    qh = (fifth << torch.arange(32, dtype=torch.int64)).sum(dim=1).to(torch.int32)  # < 2**32, as a u32
    qh_bytes = qh.contiguous().view(torch.uint8).reshape(-1, 4)
    return torch.cat([_f16_bytes(d), qh_bytes, _pack_nibbles(q[:, :16], q[:, 16:])], dim=1).numpy()


# ------------------------------------------------------------------------------------ K types
def _fit_scale_min(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants (squared error) for every row of ``x``: x ~ scale * L - min with L in
    0..nmax. Returns (scale, min, L); ``min`` >= 0 is the amount subtracted."""
    lo = torch.clamp_max(x.amin(dim=1), 0)
    hi = x.amax(dim=1)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w = _ordered_sum(weights)
    sum_x = _ordered_sum(weights * x)

    def levels(iscale):
        return torch.clamp(torch.round(iscale[:, None] * (x - lo[:, None])), 0, nmax)

    iscale = nmax / span
    scale = 1 / iscale
    best_l = levels(iscale)
    best_err = _ordered_sum(weights * (scale[:, None] * best_l + lo[:, None] - x) ** 2)
    offset = lo.clone()
    for step in range(nstep + 1):
        factor = float(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax))
        cand = levels(factor / span)
        sum_l = _ordered_sum(weights * cand)
        sum_l2 = _ordered_sum(weights * cand * cand)
        sum_xl = _ordered_sum(weights * cand * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                                 this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = _ordered_sum(weights * (this_scale[:, None] * cand + this_min[:, None] - x) ** 2)
        better = (det > 0) & (err < best_err)
        best_l = torch.where(better[:, None], cand, best_l)
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, this_scale, scale)
        offset = torch.where(better, this_min, offset)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    offset = torch.where(flat, lo, offset)
    best_l = torch.where(flat[:, None], torch.zeros_like(best_l), best_l)
    return scale, -offset, best_l


def _six_bits(v: torch.Tensor) -> torch.Tensor:
    """``MIN(63, (uint8_t) nearest_int(v))``: a negative level wraps to a large byte, which the cap makes 63."""
    level = torch.round(v)
    return torch.where(level < 0, torch.full_like(level, 63), torch.clamp_max(level, 63)).to(torch.int64)


def _q4_k(x: torch.Tensor) -> np.ndarray:
    n = x.shape[0]
    groups = x.reshape(n * 8, 32)
    rms = torch.sqrt(_ordered_sum(groups * groups) / 32)
    weights = rms[:, None] + groups.abs()
    scales, mins, levels = _fit_scale_min(groups, weights, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    scales, mins, levels = scales.reshape(n, 8), mins.reshape(n, 8), levels.reshape(n, 8, 32)
    max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)
    inv_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                            torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                          torch.zeros_like(max_min))
    ls, lm = _six_bits(inv_scale[:, None] * scales), _six_bits(inv_min[:, None] * mins)
    packed = torch.zeros((n, 12), dtype=torch.int64)
    packed[:, 0:4] = ls[:, 0:4]
    packed[:, 4:8] = lm[:, 0:4]
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    d = _f16_round(max_scale / 63)
    dmin = _f16_round(max_min / 63)
    # the levels again, against the scales as stored
    step = d[:, None] * ls.float()
    shift = dmin[:, None] * lm.float()
    safe = torch.where(step != 0, step, torch.ones_like(step))
    redone = torch.clamp(torch.round((x.reshape(n, 8, 32) + shift[:, :, None]) / safe[:, :, None]), 0, 15)
    levels = torch.where((step != 0)[:, :, None], redone, levels).reshape(n, 4, 2, 32)
    qs = _pack_nibbles(levels[:, :, 0], levels[:, :, 1]).reshape(n, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), packed.to(torch.uint8), qs], dim=1).numpy()


def _fit_symmetric(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qx_quants with rmse_type 1 (weights x^2) for every row: x ~ scale * L with L in
    -nmax..nmax-1. Returns (scale, L + nmax)."""
    peak = _signed_max(x)
    zero = peak.abs() < GROUP_MAX_EPS
    safe_peak = torch.where(zero, torch.ones_like(peak), peak)
    weights = x * x

    def levels(iscale):
        return torch.clamp(torch.round(iscale[:, None] * x), -nmax, nmax - 1)

    best_l = levels(-nmax / safe_peak)
    sum_lx = _ordered_sum(weights * x * best_l)
    sum_l2 = _ordered_sum(weights * best_l * best_l)
    scale = sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = float(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        cand = levels(-factor / safe_peak)
        lx = _ordered_sum(weights * x * cand)
        l2 = _ordered_sum(weights * cand * cand)
        better = (l2 > 0) & (lx * lx > best * l2)
        new_scale = lx / torch.where(l2 > 0, l2, torch.ones_like(l2))
        best_l = torch.where(better[:, None], cand, best_l)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * lx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, torch.where(zero[:, None], torch.zeros_like(best_l), best_l + nmax)  # C leaves 0 for a zero group


def _q6_k(x: torch.Tensor) -> np.ndarray:
    n = x.shape[0]
    scales, levels = _fit_symmetric(x.reshape(n * 16, 16), nmax=32)
    scales, levels = scales.reshape(n, 16), levels.reshape(n, 16, 16)
    max_scale = _signed_max(scales)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = _f16_round(1 / iscale)
    q_scales = torch.clamp_max(torch.round(iscale[:, None] * scales), 127)
    step = d[:, None] * q_scales
    safe = torch.where(step != 0, step, torch.ones_like(step))
    redone = torch.clamp(torch.round(x.reshape(n, 16, 16) / safe[:, :, None]), -32, 31) + 32
    levels = torch.where((step != 0)[:, :, None], redone, levels).to(torch.int64).reshape(n, 2, 4, 32)
    # per half of 128 values: ql[0:32] = v0 | v2 << 4, ql[32:64] = v1 | v3 << 4, qh = top bits of v0..v3
    ql = torch.cat([_pack_nibbles(levels[:, :, 0], levels[:, :, 2]), _pack_nibbles(levels[:, :, 1], levels[:, :, 3])],
                   dim=2).reshape(n, 128)
    top = levels >> 4
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).to(torch.uint8).reshape(n, 64)
    q_scales = torch.where(empty[:, None], torch.zeros_like(q_scales), q_scales).to(torch.int8).view(torch.uint8)
    d = torch.where(empty, torch.zeros_like(d), d)
    block = torch.cat([ql, qh, q_scales, _f16_bytes(d)], dim=1)
    block[empty, :192] = 0
    return block.numpy()


_QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
