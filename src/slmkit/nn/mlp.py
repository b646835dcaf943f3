"""Feed-forward blocks: gated (SwiGLU / GeGLU) and plain two-layer MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    """``down(act(gate x) * up x)`` — Llama, Qwen2 (SiLU) and Gemma (tanh GELU)."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act, self.activation = ACTIVATIONS[activation], activation
        self.gate_up = None  # set by models.compact.fuse: one matmul for gate|up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            if isinstance(self.gate_up, nn.Linear):
                gate, up = self.gate_up(x).chunk(2, dim=-1)
                return self.down(self.act(gate) * up)
            # compact (nn.quant): float32 in and out; silu(gate) * up in one call where the kernels are built
            ops = kernels.load() if x.dtype == torch.float32 and self.activation == "silu" else None
            if ops is not None:
                return self.down(ops.silu_mul(self.gate_up(x).contiguous()))
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(self.gate(x)) * self.up(x))


class PlainMLP(nn.Module):
    """``down(act(up x))`` — phi's fc1 / fc2."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))
