"""Rotary position embeddings, "rotate_half" (NeoX) layout as in HF transformers.

Dimension i of a head is paired with i + rotary_dim/2; ``inv_freq = 1/theta^(2i/rotary_dim)``.
Only the first ``rotary_dim`` dims rotate (phi's partial rotary); the rest pass through.
"""

from __future__ import annotations

import torch


def inv_frequencies(rotary_dim: int, theta: float, scaling_factor: float = 1.0) -> torch.Tensor:
    """A CPU table even inside ``torch.device("meta")`` (a meta arange would import torch._dynamo)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    return 1.0 / (theta ** exponent) / scaling_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [batch, 1, time, rotary_dim] for integer ``positions`` [batch, time]."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, time, head_dim] by the tables from :func:`rope_cos_sin`."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


# --- interleaved layout (compact models) ---------------------------------------------------------
# Compact checkpoints store q/k rows of each head reordered so dims (i, i + d/2) sit side by side as
# (2i, 2i+1). Attention scores are unchanged (q and k are permuted alike), and RoPE becomes one complex
# multiply over q|k together instead of five ops each on q and k.


def interleave_permutation(head_dim: int) -> torch.Tensor:
    """Row order within a head: new row 2i = old row i, new row 2i+1 = old row i + head_dim/2."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=-1).flatten()


def rope_cis(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations [batch, time, 1, rotary_dim/2] for :func:`apply_rope_interleaved`."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(freqs), freqs)[:, :, None]


def apply_rope_interleaved(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, time, heads, head_dim] whose dims are interleaved (2i, 2i+1) pairs."""
    b, t, h, d = x.shape
    pairs = torch.view_as_complex(x.float().reshape(b, t, h, d // 2, 2))
    return torch.view_as_real(pairs * cis).reshape(b, t, h, d).to(x.dtype)
