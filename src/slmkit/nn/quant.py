"""Weight-only quantized linear layers for fast CPU decoding.

``int8``: one symmetric scale per output row; matmul by slmkit's AVX2 kernel (``kernels/int8_linear.cpp``:
the activation quantized to int8 blocks of 32 on the fly, integer dot products, weights read once for all
rows of x), or by ``torch._weight_int8pack_mm`` where that kernel is not available.
``int4``: asymmetric groups of 32 along the input dim (w = q*scale + min, as GGUF Q4_1 stores it);
matmul by slmkit's AVX2 kernel (``kernels/int4_linear.cpp``), else ``torch._weight_int4pack_mm_for_cpu``.
torch's kernels take bf16 activations: decoding at batch 1 reads every weight once per token, so
the cost is the bytes of weights, and these read 1/4 and 1/8 of fp32's. The residual stream stays
in the model's dtype; only the matmul input is cast.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedError
from .. import kernels

INT4_GROUP = 32
QUANT_MODES = ("none", "int8", "int4")


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


class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.register_buffer("scale_f32", scale.float().contiguous(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        ops = kernels.load() if self.in_features % 32 == 0 else None
        self.kernel = None if ops is None else ops.int8_linear
        self.takes_bf16 = self.kernel is None  # torch's kernel casts its input to bf16; slmkit's takes fp32

    def forward_refined(self, x: torch.Tensor, candidates: int = 16) -> torch.Tensor:
        """Output-head logits: the fast kernel for every entry, then each row's ``candidates`` largest
        recomputed exactly in fp32. The kernels round (torch's outputs bf16, 3 significant digits: at 25.0 a
        step is 0.125; slmkit's rounds the activation to int8 blocks), so greedy picks would otherwise fall
        on near-ties; the true maximum lies among the approximate top few."""
        logits = self.forward(x)
        out = logits.reshape(-1, self.out_features)
        if self.kernel is not None and x.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
            kernels.load().refine_top(out, x.reshape(-1, self.in_features).float().contiguous(), self.weight_int8,
                                      self.scale_f32, self.bias, candidates)  # the same, in one C++ call
            return logits
        cols = out.topk(min(candidates, self.out_features), dim=-1).indices  # [R, C]
        weights = self.weight_int8[cols].float() * self.scale_f32[cols][..., None]  # [R, C, K]
        exact = torch.einsum("rck,rk->rc", weights, x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            exact = exact + self.bias[cols]
        return out.scatter(1, cols, exact.to(out.dtype)).reshape(logits.shape)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``out_dtype=torch.bfloat16`` skips the cast back when the next consumer takes bf16 anyway."""
        shape = x.shape
        if self.kernel is not None and x.device.type == "cpu":
            y = self.kernel(x.reshape(-1, shape[-1]).float().contiguous(), self.weight_int8, self.scale_f32)
        else:
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8, self.scale)
        y = y.to(out_dtype or x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4Linear(nn.Module):
    """4-bit weights, groups of 32: slmkit's AVX2 kernel where it runs (codes two per byte in its block
    layout, float16 scale and minimum), else torch's CPU int4 layout and kernel."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None,
                 group: int = INT4_GROUP):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = group
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        ops = kernels.load() if group == 32 and self.in_features % 32 == 0 else None
        self.kernel = None if ops is None else ops.int4_linear
        self.takes_bf16 = self.kernel is None
        if self.kernel is not None:
            # per group of 32: byte i holds code i (low nibble) and code i + 16 (high nibble)
            blocks = codes.to(torch.uint8).reshape(self.out_features, -1, 2, 16)
            packed = blocks[:, :, 0] | (blocks[:, :, 1] << 4)
            self.register_buffer("codes_blocked", packed.reshape(self.out_features, -1).contiguous())
            self.register_buffer("scale_f16", scale.to(torch.float16).contiguous())
            self.register_buffer("minimum_f16", minimum.to(torch.float16).contiguous())
            return
        if self.out_features % 16 or self.in_features % group:
            raise UnsupportedError(
                f"int4 needs out_features divisible by 16 and in_features by {group}, got {tuple(codes.shape)}")
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2))
        # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        scale_zero = torch.stack((scale.float(), minimum.float() + 8 * scale.float()), dim=-1)  # [N, G, 2]
        self.register_buffer("scale_zero", scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.kernel is not None and x.device.type == "cpu":
            y = self.kernel(flat.float().contiguous(), self.codes_blocked, self.scale_f16, self.minimum_f16)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, self.group,
                                                            self.scale_zero)
        y = y.to(out_dtype or x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


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
