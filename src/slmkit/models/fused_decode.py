"""One C++ call per decoder layer when a compact model decodes one token per row.

Eager decoding of a 30-layer model runs ~400 small torch ops per token, each costing more in dispatch
and allocation than in arithmetic. For compact (int8 / int4) Llama-style models the kernels module's
``DecodeLayer`` does a whole layer -- norms, q|k|v, RoPE, cache write, attention, o, gate|up, SiLU*up,
down, residuals -- with the same kernels and arithmetic as the eager path (tests/test_fused_decode.py
holds the two together). Any model it does not cover keeps the eager path.

:func:`decode_sequence` feeds a few new tokens of *one* sequence as the rows of one call, every row reading
and writing the same cache row and seeing the slots up to its own: each token's hidden state is then
bit-for-bit the one a one-token step would give, which speculative decoding's verify pass needs so that its
greedy output equals plain decoding's.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..nn.norms import RMSNorm
from ..nn.quant import Int4Linear, Int8Linear, dense_rows, fast_bf16


def _linear_parts(linear) -> list[torch.Tensor] | None:
    """The tensors DecodeLayer takes for a kernel-backed quantized linear, or None."""
    if isinstance(linear, Int8Linear) and linear.kernel is not None:
        parts = [linear.weight_int8, linear.scale_f32]
    elif isinstance(linear, Int4Linear) and linear.kernel is not None:
        parts = [linear.codes_blocked, linear.scale_f16, linear.minimum_f16]
    else:
        return None
    return parts if linear.bias is None else parts + [linear.bias]


def _supported(model) -> bool:
    cfg = model.cfg
    return (model.quant in ("int8", "int4") and model.device.type == "cpu" and model.dtype == torch.float32
            and cfg.norm == "rmsnorm" and not cfg.norm_unit_offset and not cfg.parallel_residual and not cfg.sandwich_norm
            and cfg.mlp == "gated" and cfg.activation == "silu" and not cfg.qk_norm and cfg.sliding_window == 0
            and all(layer.attn.rope_interleaved for layer in model.layers))


def build(model) -> list | None:
    """A ``DecodeLayer`` per layer of ``model``, or None where the fused path does not apply."""
    ops = kernels.load()
    if ops is None or not hasattr(ops, "DecodeLayer") or not _supported(model):
        return None
    layers = []
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        parts = [_linear_parts(attn.qkv), _linear_parts(attn.o), _linear_parts(mlp.gate_up), _linear_parts(mlp.down)]
        norms = (layer.attn_norm, layer.ffn_norm)
        if any(p is None for p in parts) or not all(isinstance(n, RMSNorm) for n in norms):
            return None
        layers.append(ops.DecodeLayer(layer.attn_norm.weight.detach(), layer.ffn_norm.weight.detach(),
                                      layer.attn_norm.eps, *parts, attn.n_heads, attn.n_kv_heads, attn.head_dim,
                                      model.inv_freq.float().contiguous(), attn.scale, fast_bf16()))
    return layers


def decode(layers: list, x: torch.Tensor, positions: torch.Tensor, cache, start: int,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden states [B, 1, D] after every layer, for one new token per row (``x`` [B, 1, D])."""
    b = x.shape[0]
    keys, values, slots, span = cache.decode_slots(start, b)
    valid = None if mask is None else mask.reshape(b, span)
    pos = positions.reshape(b).contiguous()
    h = x.reshape(b, -1).contiguous()
    dense_from = dense_rows()
    for layer, k, v in zip(layers, keys, values):
        h = layer.forward(h, pos, k, v, slots, span, valid, dense_from)
    return h.reshape(b, 1, -1)


def decode_sequence(layers: list, x: torch.Tensor, positions: torch.Tensor, cache, start: int) -> torch.Tensor:
    """Hidden states [1, T, D] for T new tokens of one sequence (``x`` [1, T, D]) at slots ``start ..``,
    each as a one-token step at its own position computes it."""
    t = x.shape[1]
    keys, values, _, _ = cache.decode_slots(start, 1)
    slots = torch.arange(start, start + t, dtype=torch.int64)
    span = start + t
    valid = torch.arange(span)[None, :] <= slots[:, None]  # row i sees slots 0 .. start + i
    pos = positions.reshape(t).contiguous()
    h = x.reshape(t, -1).contiguous()
    dense_from = dense_rows()
    for layer, k, v in zip(layers, keys, values):  # every row reads and writes cache row 0 (a stride-0 view)
        h = layer.forward(h, pos, k[:1].expand(t, *k.shape[1:]), v[:1].expand(t, *v.shape[1:]), slots, span,
                          valid, dense_from)
    return h.reshape(1, t, -1)
