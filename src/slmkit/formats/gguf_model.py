"""Turn a GGUF file into a ModelConfig and weights in slmkit's key names.

Two GGUF conventions are undone here: llama.cpp permutes the Q/K rows of ``llama`` models into
interleaved RoPE pairs (we restore the rotate-half layout), and Gemma norms are stored as ``w + 1``.
Weights are read lazily (:class:`GGUFWeights`), so a compact load never holds the whole model in fp32.
"""

from __future__ import annotations

from typing import Iterator

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


class GGUFWeights:
    """A read-only mapping: slmkit key -> float32 tensor, dequantized and converted when asked for."""

    def __init__(self, gguf: GGUFFile, cfg: ModelConfig):
        self.gguf, self.cfg = gguf, cfg
        self.permuted = gguf.architecture in PERMUTED_QK_ARCHS
        self.sources: dict[str, tuple[str, int | None]] = {}  # key -> (gguf name, part of a fused qkv)
        for name in gguf.tensors:
            key = gguf_to_slm(name)
            if key is None:
                continue
            if ".attn.qkv." in key:
                for part, letter in enumerate("qkv"):
                    self.sources[key.replace(".qkv.", f".{letter}.")] = (name, part)
            else:
                self.sources[key] = (name, None)

    def keys(self):
        return self.sources.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def __getitem__(self, key: str) -> torch.Tensor:
        name, part = self.sources[key]
        t = self.gguf.tensor(name)
        if part is not None:
            cfg = self.cfg
            q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            t = torch.split(t, [q_rows, kv_rows, kv_rows], dim=0)[part].contiguous()
        return self._convert(key, t)

    def row_chunks(self, key: str, rows: int = 4096) -> Iterator[torch.Tensor]:
        """A big 2-D table (embedding, head) a block of rows at a time; no conversion applies to those."""
        name, _ = self.sources[key]
        yield from self.gguf.row_chunks(name, rows)

    def _convert(self, key: str, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.permuted and key.endswith(("attn.q.weight", "attn.q.bias")):
            t = unpermute_qk(t, cfg.n_heads)
        elif self.permuted and key.endswith(("attn.k.weight", "attn.k.bias")):
            t = unpermute_qk(t, cfg.n_kv_heads)
        if cfg.norm_unit_offset and key.endswith("norm.weight"):
            t = t - 1.0
        return t


def open_gguf_model(gguf: GGUFFile) -> tuple[ModelConfig, GGUFWeights]:
    shapes = {name: info.shape for name, info in gguf.tensors.items()}
    cfg = ModelConfig.from_gguf(gguf.metadata, shapes)
    return cfg, GGUFWeights(gguf, cfg)


def read_gguf_model(gguf: GGUFFile, dtype: torch.dtype = torch.float32):
    """Config and the full state dict, every tensor dequantized to ``dtype``."""
    cfg, weights = open_gguf_model(gguf)
    return cfg, {key: weights[key].to(dtype) for key in weights.keys()}
