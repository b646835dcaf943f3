"""Turn a GGUF file into a ModelConfig and a state dict in slmkit's key names.

Two GGUF conventions are undone here: llama.cpp permutes the Q/K rows of ``llama`` models into
interleaved RoPE pairs (we restore the rotate-half layout), and Gemma norms are stored as ``w + 1``.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .gguf import GGUFFile
from .keys import gguf_to_slm

# GGUF architectures whose Q/K weights llama.cpp permuted (LLAMA_ROPE_TYPE_NORM)
PERMUTED_QK_ARCHS = {"llama"}


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``reshape(n, 2, r/n/2, c).swapaxes(1, 2)`` on a Q or K weight (or bias)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def read_gguf_model(gguf: GGUFFile, dtype: torch.dtype = torch.float32):
    shapes = {name: info.shape for name, info in gguf.tensors.items()}
    cfg = ModelConfig.from_gguf(gguf.metadata, shapes)
    permuted = gguf.architecture in PERMUTED_QK_ARCHS
    state: dict[str, torch.Tensor] = {}
    for name in gguf.tensors:
        key = gguf_to_slm(name)
        if key is None:
            continue
        t = gguf.tensor(name)
        if permuted and key.endswith(("attn.q.weight", "attn.q.bias")):
            t = unpermute_qk(t, cfg.n_heads)
        elif permuted and key.endswith(("attn.k.weight", "attn.k.bias")):
            t = unpermute_qk(t, cfg.n_kv_heads)
        if cfg.norm_unit_offset and key.endswith("norm.weight"):
            t = t - 1.0
        if ".attn.qkv." in key:
            q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            q, k, v = torch.split(t, [q_rows, kv_rows, kv_rows], dim=0)
            for part, value in zip("qkv", (q, k, v)):
                state[key.replace(".qkv.", f".{part}.")] = value.to(dtype)
            continue
        state[key] = t.to(dtype)
    return cfg, state
