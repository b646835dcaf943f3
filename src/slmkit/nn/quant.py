"""Weight-only quantized linear layers for fast CPU inference.

``int8``: one symmetric scale per output row. ``int4``: asymmetric groups of 32 along the input dim
(w = q*scale + min, as GGUF Q4_1 stores it; float16 scale and minimum). Each layer computes ``x @ W.T`` on one
of two paths, chosen by the number of rows (:func:`compact_path`):

* **blocks** (decoding: few rows): the activation is rounded to int8 blocks of 32 (scale max|x|/127, round half
  to even, llama.cpp's Q8 form) and meets the weights in integer dot products. slmkit's kernels do this with
  AVX-512 VNNI or AVX2 (``kernels/int8_linear.cpp``, ``int4_linear.cpp``); without them the same rounding is
  done in torch and multiplied in float32 (:func:`round_to_int8_blocks`). All three give one answer, up to
  the order of float32 additions (tests/test_compact_paths.py).
* **dense** (prefill, scoring: many rows): the weight is expanded to bfloat16 one layer (or one slice of the
  output head) at a time and multiplied by the bfloat16-rounded activation, products summed in float32 and the
  result rounded to bfloat16 -- by oneDNN's AMX / AVX-512 BF16 code where the CPU multiplies bf16 natively,
  else by the same steps in float32, so the answer does not depend on the CPU either. Here a many-row matmul is compute-bound, and those
  units beat any integer kernel (docs/benchmarks.md has the crossover).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .. import kernels

INT4_GROUP = 32
QUANT_MODES = ("none", "int8", "int4")
# rows from which the dense path is faster than the block kernels (bench/prefill_path.py; docs/benchmarks.md,
# "prefill path"): where oneDNN multiplies bf16 natively (AMX, AVX-512 BF16) from 32 rows; where bf16 is
# emulated in float32 (AVX2-only CPUs) the expanded weight costs more and the crossover is at 128 rows
DENSE_ROWS = 32
DENSE_ROWS_EMULATED = 128
DENSE_SLICE = 8192  # output rows expanded at a time on the dense path (the tied head: 8192 x 576 bf16 = 9 MB)
PATHS = ("auto", "dense", "avx512", "avx2", "torch")
_forced_path = "auto"


def set_compact_path(path: str) -> str:
    """Force one path for every compact layer (tests and benchmarks): ``dense``, the block kernels' ``avx512``
    or ``avx2`` variant, ``torch`` (the blocks path without slmkit's kernels), or ``auto``. Returns the
    previous setting. ``avx512`` on a CPU without it is an error."""
    global _forced_path
    if path not in PATHS:
        raise UnsupportedError(f"unknown compact path {path!r} (choose from {', '.join(PATHS)})")
    ops = kernels.load()
    if path in ("avx512", "avx2"):
        if ops is None:
            raise UnsupportedError(f"the {path} path needs slmkit's kernels, which are not built here")
        if path == "avx512" and not ops.cpu_has_avx512():
            raise UnsupportedError("this CPU has no AVX-512 VNNI")
        ops.set_avx512(path == "avx512")
    elif ops is not None:
        ops.set_avx512(True)  # the default: AVX-512 where the CPU has it
    previous, _forced_path = _forced_path, path
    return previous


def block_kernels_forced_off() -> bool:
    """True while a forced path keeps slmkit's block kernels out (``torch`` or ``dense``): the fused decode
    layer, which calls them directly, must step aside too."""
    return _forced_path in ("torch", "dense")


def dense_rows() -> int:
    """Rows from which a compact layer takes the dense path now (CompactLinear.path and the fused decode
    layer choose alike): DENSE_ROWS where this CPU multiplies bf16 natively, DENSE_ROWS_EMULATED where it
    does not; never while another path is forced (and from one row while ``dense`` is)."""
    if _forced_path == "auto":
        return DENSE_ROWS if fast_bf16() else DENSE_ROWS_EMULATED
    return 1 if _forced_path == "dense" else 2 ** 62


@contextlib.contextmanager
def compact_path(path: str):
    """``with compact_path("avx2"): ...`` -- :func:`set_compact_path` for a block of code."""
    previous = set_compact_path(path)
    try:
        yield
    finally:
        set_compact_path(previous)


@functools.cache
def fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (oneDNN: AMX or AVX-512), not by emulation."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def round_to_int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` [M, K] float32 as the block kernels see it: per block of 32, q = round_half_even(x / s) with
    s = max|x| / 127, returned as q * s (the torch path's form of the kernels' quantize_row)."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse).clamp_(-128, 127) * scale).reshape(m, k)


class CompactLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the choice of path and the dense matmul."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None
    kernel = None
    takes_bf16 = False  # every path takes and returns float32

    def dense_weight(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Output rows ``rows`` of the weight, expanded to ``dtype`` (float32 or bfloat16)."""
        raise NotImplementedError

    def block_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [M, K] float32 @ W.T on the blocks path (no bias)."""
        raise NotImplementedError

    def path(self, rows: int) -> str:
        if _forced_path != "auto":
            return "dense" if _forced_path == "dense" else ("torch" if _forced_path == "torch" else "kernel")
        if rows >= dense_rows():
            return "dense"
        return "kernel" if self.kernel is not None else "torch"

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [M, K] float32 @ W.T with both rounded to bfloat16, products summed in float32 and the sums
        rounded to bfloat16 (oneDNN's bf16 matmul; elsewhere the same steps in float32), returned as float32."""
        native = fast_bf16()
        xb = x.to(torch.bfloat16) if native else x.to(torch.bfloat16).float()

        def product(rows: slice) -> torch.Tensor:
            w = self.dense_weight(rows, torch.bfloat16)
            return F.linear(xb, w) if native else F.linear(xb, w.float()).to(torch.bfloat16)

        if self.out_features <= DENSE_SLICE:
            return product(slice(None)).float()
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        for start in range(0, self.out_features, DENSE_SLICE):
            rows = slice(start, min(start + DENSE_SLICE, self.out_features))
            out[:, rows] = product(rows)
        return out

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float().contiguous()
        path = self.path(flat.shape[0]) if x.device.type == "cpu" else "torch"
        if path == "dense":
            y = self.dense_matmul(flat)
        elif path == "kernel" and self.kernel is not None:
            y = self.block_matmul(flat)
        else:
            y = round_to_int8_blocks(flat) @ self.dense_weight(slice(None), torch.float32).T
        y = y.to(out_dtype or x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``w ≈ q * scale[:, None]``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    scaled = w / scale[:, None]  # one float temporary, then rounded in place
    return scaled.round_().clamp_(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of ``group`` inputs: ``w ≈ q * scale + minimum``, q in 0..15."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, lo


class Int8Linear(CompactLinear):
    """int8 weights, one scale per output row (slmkit's kernel: ``kernels/int8_linear.cpp``)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % 32:
            raise UnsupportedError(f"int8 needs in_features divisible by 32, got {tuple(q.shape)}")
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.register_buffer("scale_f32", scale.float().contiguous(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        ops = kernels.load()
        self.kernel = None if ops is None else ops.int8_linear

    def dense_weight(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        ops = kernels.load()
        weight, scale = self.weight_int8[rows], self.scale_f32[rows]
        if ops is not None:
            return ops.int8_dequantize(weight, scale, dtype)
        return (weight.float() * scale[:, None]).to(dtype)

    def block_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight_int8, self.scale_f32)

    def forward_refined(self, x: torch.Tensor, candidates: int = 16) -> torch.Tensor:
        """Output-head logits: the fast path for every entry, then each row's ``candidates`` largest
        recomputed exactly in fp32 (the paths round the activation, to int8 blocks or to bf16, so greedy picks
        would otherwise fall on near-ties; the true maximum lies among the approximate top few)."""
        logits = self.forward(x)
        out = logits.reshape(-1, self.out_features)
        flat = x.reshape(-1, self.in_features).float().contiguous()
        ops = kernels.load()
        if ops is not None and x.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
            ops.refine_top(out, flat, self.weight_int8, self.scale_f32, self.bias, candidates)  # one C++ call
            return logits
        cols = out.topk(min(candidates, self.out_features), dim=-1).indices  # [R, C]
        weights = self.weight_int8[cols].float() * self.scale_f32[cols][..., None]  # [R, C, K]
        exact = torch.einsum("rck,rk->rc", weights, flat)
        if self.bias is not None:
            exact = exact + self.bias[cols]
        return out.scatter(1, cols, exact.to(out.dtype)).reshape(logits.shape)


def block_layout(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> [N, K/2] bytes in groups of 32: byte i of a group = code i | code i+16 << 4."""
    blocks = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def natural_layout(codes_blocked: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`block_layout`: [N, K/2] bytes -> codes [N, K]."""
    n = codes_blocked.shape[0]
    halves = codes_blocked.reshape(n, -1, 16)
    return torch.stack((halves & 15, halves >> 4), dim=2).reshape(n, -1)


class Int4Linear(CompactLinear):
    """4-bit weights in groups of 32 (slmkit's kernel: ``kernels/int4_linear.cpp``): codes two per byte in the
    kernel's block layout (byte i of a group = code i | code i+16 << 4), float16 scale and minimum."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None,
                 group: int = INT4_GROUP):
        """``codes`` [N, K] in 0..15 (one per weight)."""
        if group != INT4_GROUP or codes.shape[1] % group:
            raise UnsupportedError(f"int4 needs groups of {INT4_GROUP} and in_features divisible by {INT4_GROUP}, "
                                   f"got group {group} and shape {tuple(codes.shape)}")
        super().__init__()
        self._hold(block_layout(codes), scale, minimum, bias)

    @classmethod
    def from_blocked(cls, codes_blocked: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                     bias: torch.Tensor | None) -> "Int4Linear":
        """From codes already in the block layout ([N, K/2] uint8; GGUF Q4_1 stores its codes this way)."""
        layer = cls.__new__(cls)
        CompactLinear.__init__(layer)
        layer._hold(codes_blocked, scale, minimum, bias)
        return layer

    def _hold(self, codes_blocked, scale, minimum, bias) -> None:
        self.out_features, self.in_features = codes_blocked.shape[0], codes_blocked.shape[1] * 2
        self.group = INT4_GROUP
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.register_buffer("codes_blocked", codes_blocked.contiguous())
        self.register_buffer("scale_f16", scale.to(torch.float16).contiguous())
        self.register_buffer("minimum_f16", minimum.to(torch.float16).contiguous())
        ops = kernels.load()
        self.kernel = None if ops is None else ops.int4_linear

    def dense_weight(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        codes, scale, minimum = self.codes_blocked[rows], self.scale_f16[rows], self.minimum_f16[rows]
        ops = kernels.load()
        if ops is not None:
            return ops.int4_dequantize(codes, scale, minimum, dtype)
        n = codes.shape[0]
        groups = natural_layout(codes).reshape(n, -1, 32).float()  # [N, K/32, 32]
        w = groups * scale.float()[..., None] + minimum.float()[..., None]
        return w.reshape(n, self.in_features).to(dtype)

    def block_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.codes_blocked, self.scale_f16, self.minimum_f16)


class Int8Embedding(nn.Module):
    """Embedding rows gathered from an :class:`Int8Linear` (the tied output head), so the table is held once."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = [head]  # a list, so the shared tensors are not registered (and saved) twice

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.weight_int8[ids].float() * head.scale[ids].float()[..., None]


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of ``linears``' outputs (q|k|v or gate|up)."""
    has_bias = linears[0].bias is not None
    if linears[0].weight.is_meta:  # a skeleton (models.build.skeleton): only the shape matters
        return nn.Linear(linears[0].in_features, sum(l.out_features for l in linears), bias=has_bias,
                         device="meta")
    weight = torch.cat([l.weight.detach() for l in linears], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([l.bias.detach() for l in linears]), requires_grad=False)
    return fused


def check_mode(mode: str | None) -> str:
    mode = mode or "none"
    if mode not in QUANT_MODES:
        raise UnsupportedError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    return mode
