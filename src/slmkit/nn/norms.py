"""Normalisation layers: RMSNorm (Llama, Qwen2, and Gemma's 1+w variant) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` computed in fp32.

    Llama casts the normalised value back to the input dtype before multiplying by ``w``;
    Gemma (``unit_offset``) stores ``w`` centred on 0, multiplies by ``1 + w`` in fp32, then casts.
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.unit_offset:
            ops = kernels.load() if x.device.type == "cpu" and not torch.compiler.is_compiling() else None
            if ops is not None and self.weight.dtype == torch.float32 and kernels.inference_only(x, self.weight):
                return ops.rms_norm(x.contiguous(), self.weight, self.eps)  # one call instead of eight ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = False, unit_offset: bool = False) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    return RMSNorm(dim, eps, unit_offset)
