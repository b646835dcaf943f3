"""Turn a GGUF file into a ModelConfig and weights in slmkit's key names.

Two GGUF conventions are undone here: llama.cpp permutes the Q/K rows of ``llama`` models into
interleaved RoPE pairs (we restore the rotate-half layout), and Gemma norms are stored as ``w + 1``.
Weights are read lazily (:class:`GGUFWeights`), so a compact load never holds the whole model in fp32.
"""

from __future__ import annotations

import math
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

    def q4_1_groups(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A Q4_1 weight as stored, without dequantizing: (codes [N, K/2] uint8 in Q4_1's byte order -- byte i
        of a group of 32 holds code i and code i+16 << 4 --, scale and minimum float16 [N, K/32]) with
        w = code * scale + minimum, rows in slmkit's order; None for other types."""
        name, part = self.sources[key]
        info = self.gguf.tensors[name]
        if info.type_name != "Q4_1" or len(info.shape) != 2:
            return None
        n, k = info.shape
        first, count = 0, n
        if part is not None:
            cfg = self.cfg
            q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            first, count = (0, q_rows, q_rows + kv_rows)[part], (q_rows, kv_rows, kv_rows)[part]
        # rows reordered as _convert reorders a dequantized tensor's (llama.cpp's Q/K permutation undone)
        order = self._convert(key, torch.arange(count, dtype=torch.float64)[:, None])[:, 0].long()
        blocks = torch.from_numpy(self.gguf.raw(name, first, count)).reshape(count, k // 32, 20)[order]
        halves = blocks[..., :4].contiguous().view(torch.float16)  # f16 scale, f16 minimum per group
        codes = blocks[..., 4:].reshape(count, k // 2).contiguous()
        return codes, halves[..., 0].contiguous(), halves[..., 1].contiguous()

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


# The compact mode that runs a GGUF file's own quantization, as llama.cpp runs the file as it is: 2-4-bit
# types -> int4 (groups of 32 with a minimum: Q4_1's form), 5-8-bit types -> int8, float types -> none.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def file_quant(gguf: GGUFFile) -> tuple[str, str]:
    """(compact mode, the storage type it follows) for ``gguf``: the type holding most of the decoder layers'
    weights decides (a Q4_K_M file keeps some tensors in Q6_K; Q4_K holds the most)."""
    sizes: dict[str, int] = {}
    for name, info in gguf.tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(info.shape) == 2:
            sizes[info.type_name] = sizes.get(info.type_name, 0) + math.prod(info.shape)
    if not sizes:
        return "none", "none"
    kind = max(sizes, key=sizes.get)
    if kind in FLOAT_TYPES:
        return "none", kind
    bits = next((int(c) for c in kind if c.isdigit()), 8)  # Q4_1 -> 4, IQ3_S -> 3, TQ1_0 -> 1
    return ("int4" if bits <= 4 else "int8"), kind
