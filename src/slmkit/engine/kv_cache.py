"""A preallocated key/value cache: one [batch, kv_heads, max_len, head_dim] pair per layer."""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store ``k, v`` [B, H, T, D] at slots ``start .. start+T``; return views of slots ``0 .. start+T``."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def decode_slots(self, start: int, batch: int):
        """For a one-token step of ``batch`` rows at ``start``: (keys, values per layer, each row's slot, span)."""
        slots = torch.full((batch,), start, dtype=torch.int64, device=self.keys[0].device)
        return self.keys, self.values, slots, start + 1

    def load_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
        """Copy per-layer keys/values [1 or B, H, N, D] into slots ``0 .. N`` of every row; return N."""
        n = keys[0].shape[2]
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.keys[layer][:, :, :n] = k
            self.values[layer][:, :, :n] = v
        return n
