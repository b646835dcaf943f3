"""Multi-head attention with grouped KV heads, RoPE, optional q/k norms and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .norms import RMSNorm
from .rope import apply_rope, apply_rope_interleaved


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.query_scale
        self.q = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attn_out_bias)
        self.qkv = None  # set by models.compact.fuse: one matmul for q|k|v
        self.rope_interleaved = False  # set by formats.compact for checkpoints with interleaved q/k rows
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache=None, layer: int = 0, start: int = 0) -> torch.Tensor:
        """``x`` [B, T, D]; ``mask`` bool [B, 1, T, S] (True = may attend) or None for plain causal.

        With a ``cache`` the new keys/values are written at storage slots ``start .. start+T`` and the
        query attends over slots ``0 .. start+T``.
        """
        b, t, _ = x.shape
        if self.rope_interleaved:
            q, k, v = self._project_interleaved(x, cos)
        elif self.qkv is not None:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if not self.rope_interleaved:
            q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        if t == 1:
            ops = kernels.load() if q.device.type == "cpu" and not torch.compiler.is_compiling() else None
            if (ops is not None and q.dtype == torch.float32 and k.dtype in (torch.float32, torch.float16)
                    and kernels.inference_only(q, k, v)
                    and (mask is None or mask.shape[-1] == k.shape[2])):  # one call instead of ten ops
                valid = None if mask is None else mask.reshape(b, k.shape[2])
                out = ops.attend_one(q.reshape(b, self.n_heads, self.head_dim).contiguous(), k, v, valid, self.scale)
                return self.o(out.reshape(b, 1, self.n_heads * self.head_dim))
            k, v = k.to(q.dtype), v.to(q.dtype)  # a float16 cache (Decoder.cache_dtype) is read as q's dtype
            return self.o(self._attend_one(q, k, v, mask).reshape(b, 1, self.n_heads * self.head_dim))
        k, v = k.to(q.dtype), v.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _project_interleaved(self, x, cis):
        """q, k, v [B, heads, T, D] from the fused projection, RoPE applied to q|k in one multiply."""
        b, t, _ = x.shape
        qk_width = (self.n_heads + self.n_kv_heads) * self.head_dim
        out = self.qkv(x)
        qk = apply_rope_interleaved(out[..., :qk_width].reshape(b, t, -1, self.head_dim), cis)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        v = out[..., qk_width:].reshape(b, t, self.n_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attend_one(self, q, k, v, mask):
        """Attention for a single new token per row: two small matmuls, the query heads of each
        KV group stacked so the cache is never repeated (cheaper than SDPA's set-up at this size)."""
        b, group = q.shape[0], self.n_heads // self.n_kv_heads
        qg = q.reshape(b, self.n_kv_heads, group, self.head_dim)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * self.scale  # [B, KV, G, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).to(v.dtype)
        return torch.matmul(probs, v)  # [B, KV, G, D] == [B, H, D] in head order
