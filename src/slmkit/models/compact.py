"""Make a loaded decoder compact and fast for CPU inference.

``fuse`` merges q|k|v and gate|up into single matmuls (fewer, larger kernels per layer).
``compact`` then swaps every linear layer for a weight-only quantized one (int8 or int4) and turns
the embedding table and output head into one int8 table: the head is a matmul over it, the
embedding a row gather from it, so a tied table is held once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.quant import Int8Embedding, Int8Linear, check_mode, fuse_linears, quantize_int8, quantize_linear
from .decoder import Decoder


def fuse(model: Decoder) -> Decoder:
    for layer in model.layers:
        attn = layer.attn
        if attn.qkv is None:
            attn.qkv = fuse_linears([attn.q, attn.k, attn.v])
            del attn.q, attn.k, attn.v
        mlp = layer.mlp
        if getattr(mlp, "gate_up", None) is None and hasattr(mlp, "gate"):
            mlp.gate_up = fuse_linears([mlp.gate, mlp.up])
            del mlp.gate, mlp.up
    return model


@torch.no_grad()
def compact(model: Decoder, mode: str) -> Decoder:
    """Quantize ``model`` in place (``mode``: int8 or int4); ``none`` leaves it as it is."""
    mode = check_mode(mode)
    if mode == "none":
        return model
    fuse(model)
    for layer in model.layers:
        for parent in (layer.attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, mode))
    if model.lm_head is None:  # tied: one int8 table serves as head and embedding
        q, scale = quantize_int8(model.embed.weight)
        model.lm_head = Int8Linear(q, scale, None)
        model.embed = Int8Embedding(model.lm_head)
    else:
        model.lm_head = quantize_linear(model.lm_head, mode)
        q, scale = quantize_int8(model.embed.weight)
        model.embed = Int8Embedding(Int8Linear(q, scale, None))
    model.quant = mode
    return model
