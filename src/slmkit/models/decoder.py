"""The decoder-only transformer: Llama / SmolLM2 / TinyLlama, Phi, Qwen2 and Gemma 3 by config flags.

One block, two residual wirings::

    sequential (Llama, Qwen2, Gemma):           parallel (Phi):
      x = x + [post_attn_norm](attn(attn_norm x))     h = attn_norm x
      x = x + [post_ffn_norm](mlp(ffn_norm x))        x = x + attn(h) + mlp(h)

The bracketed norms exist only with ``sandwich_norm`` (Gemma 3).
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..nn.attention import Attention
from ..nn.mlp import GatedMLP, PlainMLP
from ..nn.norms import make_norm
from ..nn.quant import block_kernels_forced_off, dense_rows
from ..nn.rope import inv_frequencies, rope_cis, rope_cos_sin
from . import fused_decode


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index, self.parallel = index, cfg.parallel_residual
        self.sliding = cfg.is_sliding(index)

        def norm():
            return make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.norm_bias, cfg.norm_unit_offset)

        self.attn_norm = norm()
        self.attn = Attention(cfg)
        mlp_cls = GatedMLP if cfg.mlp == "gated" else PlainMLP
        self.mlp = mlp_cls(cfg.hidden_size, cfg.intermediate_size, cfg.activation, cfg.mlp_bias)
        self.ffn_norm = None if cfg.parallel_residual else norm()
        self.post_attn_norm = norm() if cfg.sandwich_norm else None
        self.post_ffn_norm = norm() if cfg.sandwich_norm else None

    def forward(self, x, cos, sin, mask, cache=None, start: int = 0) -> torch.Tensor:
        h = self.attn_norm(x)
        a = self.attn(h, cos, sin, mask, cache, self.index, start)
        if self.parallel:
            return x + a + self.mlp(h)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        m = self.mlp(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            m = self.post_ffn_norm(m)
        return x + m


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, cfg.norm_bias, cfg.norm_unit_offset)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.register_buffer("inv_freq", inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_factor),
                             persistent=False)
        self.register_buffer("inv_freq_local", inv_frequencies(cfg.rotary_dim, cfg.rope_local_theta),
                             persistent=False)

    quant = "none"  # set by formats.compact.build_compact
    _fused_layers: list | None | bool = False  # models.fused_decode's layers, built at the first decode step
    gradient_checkpointing = False  # training: recompute each block in the backward pass instead of storing it

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied to the embedding table
            return F.linear(h, self.embed.weight)
        if hasattr(self.lm_head, "forward_refined"):  # compact head: exact logits where they matter
            return self.lm_head.forward_refined(h)
        return self.lm_head(h)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: float16 where the fused C++ decode reads and writes the cache (compact CPU
        models; llama.cpp's default too) -- half the memory and half the bytes each step reads -- else the
        model's own dtype."""
        return torch.float16 if self._fused_decode_layers() is not None else self.dtype

    def _fused_decode_layers(self):
        """The compact model's one-call-per-layer decode path (models.fused_decode), built once; or None."""
        if self._fused_layers is False:
            self._fused_layers = fused_decode.build(self)
        return self._fused_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache=None,
        start: int = 0,
        last_only: bool = False,
        attn_mask: torch.Tensor | None = None,
        stepwise: bool = False,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` [B, T].

        ``positions`` [B, T] are RoPE positions (default ``start + arange(T)``); ``key_valid`` [B, S] marks
        the storage slots (cached and new) holding real tokens, so left padding is never attended to.
        With ``last_only`` only the last position's logits are computed (generation).
        ``attn_mask`` [B, T, S] (True = may attend) replaces the causal mask: packed sequences that share
        a prefix (S == T, eval.scoring) or rows of a cache with lengths of their own (engine.batcher).
        With ``stepwise`` (one row, a cache), a compact model computes each new token exactly as a one-token
        decoding step would (models.fused_decode.decode_sequence; speculative decoding's verify pass).
        """
        x = self.features(input_ids, positions, key_valid, cache, start, attn_mask, stepwise)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def features(self, input_ids, positions=None, key_valid=None, cache=None, start: int = 0,
                 attn_mask: torch.Tensor | None = None, stepwise: bool = False) -> torch.Tensor:
        """The final normed hidden states [B, T, D]: ``forward`` without the output head."""
        b, t = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(start, start + t, device=device).expand(b, t)
        x = self.embed(input_ids).to(self.dtype)
        if self.cfg.embed_scale:
            x = x * torch.tensor(math.sqrt(self.cfg.hidden_size)).to(x.dtype)
        if attn_mask is not None:
            masks = custom_masks(self.cfg, attn_mask, positions)
        else:
            masks = attention_masks(self.cfg, t, start, key_valid, device)
        one_step = t == 1 or (stepwise and b == 1 and key_valid is None and attn_mask is None and t < dense_rows())
        if (one_step and self.quant != "none" and x.device.type == "cpu" and hasattr(cache, "decode_slots")
                and not block_kernels_forced_off()):
            fused = self._fused_decode_layers()  # RoPE happens inside: no tables needed
            if fused is not None and t == 1:
                return self.norm(fused_decode.decode(fused, x, positions, cache, start, masks[False]))
            if fused is not None:
                return self.norm(fused_decode.decode_sequence(fused, x, positions, cache, start))
        if self.layers[0].attn.rope_interleaved:  # compact checkpoint: complex rotations, one table
            cos, sin = rope_cis(positions, self.inv_freq), None
        else:
            cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        local = (cos, sin)
        if self.cfg.rope_local_theta != self.cfg.rope_theta or self.cfg.rope_scaling_factor != 1.0:
            local = rope_cos_sin(positions, self.inv_freq_local, x.dtype)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            c, s = local if layer.sliding else (cos, sin)
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(layer, x, c, s, masks[layer.sliding], use_reentrant=False)
            else:
                x = layer(x, c, s, masks[layer.sliding], cache, start)
        return self.norm(x)


def attention_masks(cfg: ModelConfig, t: int, start: int, key_valid, device):
    """Boolean masks [B|1, 1, T, S] for (full, sliding) layers, or None where plain causal suffices.

    Slot ``j`` is visible to query slot ``i`` when ``j <= i``, the slot holds a real token and, on
    sliding layers, ``i - j < window``. A query always sees its own slot, so a padding row never has
    every key masked (which would give NaN).
    """
    s = start + t
    need_full = key_valid is not None or (start > 0 and t > 1)
    need_sliding = cfg.sliding_window > 0 and s > cfg.sliding_window
    if not need_full and not need_sliding:
        return {False: None, True: None}
    q_slot = torch.arange(start, s, device=device)[:, None]
    k_slot = torch.arange(s, device=device)[None, :]
    full = k_slot <= q_slot
    if key_valid is not None:
        full = (full[None] & key_valid[:, None, :s]) | (k_slot == q_slot)[None]
    else:
        full = full[None]
    sliding = full & (q_slot - k_slot < cfg.sliding_window) if cfg.sliding_window else full
    return {False: full[:, None], True: sliding[:, None]}


def custom_masks(cfg: ModelConfig, attn_mask: torch.Tensor, positions: torch.Tensor):
    """(full, sliding) masks [B, 1, T, S] from a caller's mask [B, T, S]; sliding layers also limit the
    distance in RoPE positions. Keys are the T new tokens themselves when S == T (a packed sequence,
    whose positions differ from slot indices), else cache slots whose position is their index."""
    full = attn_mask[:, None]
    if not cfg.sliding_window:
        return {False: full, True: full}
    s = attn_mask.shape[-1]
    keys = positions if s == positions.shape[-1] else torch.arange(s, device=positions.device).expand(len(positions), s)
    near = (positions[:, :, None] - keys[:, None, :]) < cfg.sliding_window
    return {False: full, True: full & near[:, None]}
