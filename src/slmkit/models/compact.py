"""The fused layout of compact models: q|k|v and gate|up as single matmuls (fewer, larger kernels).

formats.compact quantizes weights into this layout and builds the model from them.
"""

from __future__ import annotations

from ..nn.quant import fuse_linears
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
