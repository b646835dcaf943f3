"""Export a decoder model (Llama, Qwen2, Phi, Gemma 3 shapes) to a GGUF file that llama.cpp and Ollama run.

What the reader undoes, the writer does: Q/K rows of ``llama`` models permuted into llama.cpp's interleaved
RoPE pairs, Gemma norms stored as ``1 + w``, slmkit's key names turned into GGUF's. Tensor types follow
llama.cpp's ``llama-quantize`` for the four offered modes:

* ``f16``: matrices F16; vectors (norms, biases) F32, as always.
* ``q8_0``: every matrix Q8_0.
* ``q4_0``: matrices Q4_0; the output table (the embedding when tied) Q6_K.
* ``q4_k_m``: matrices Q4_K; ``attn_v`` and ``ffn_down`` Q6_K in the layers llama.cpp gives more bits (the
  first and last eighth, and every third in between); the output table Q6_K.

A matrix whose rows do not split into whole 256-value super-blocks falls back as llama.cpp falls back
(Q4_K -> Q5_0, Q6_K -> Q8_0), and one that does not split into 32-value blocks stays F16.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..errors import SlmError, UnsupportedError
from .gguf import GGUFFile
from .gguf_quantize import block_size, quantize
from .gguf_tokenizer import copied_tokenizer_metadata, tokenizer_metadata
from .gguf_write import FLOAT32, UINT32, TensorEntry, Typed, write_gguf
from .keys import slm_to_gguf

QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # llama_ftype, general.file_type
ARCH_OF_FAMILY = {"llama": "llama", "qwen2": "qwen2", "phi": "phi2", "gemma3_text": "gemma3"}
SLIDING_PATTERN = 6  # llama.cpp's Gemma 3: every 6th layer global, the others sliding-window
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K permutation (rotate-half pairs -> interleaved pairs); ``unpermute_qk`` undoes it."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def check_exportable(cfg: ModelConfig) -> str:
    """The GGUF architecture for ``cfg``; an error naming what llama.cpp could not run the same way."""
    arch = ARCH_OF_FAMILY.get(cfg.family)
    if arch is None:
        raise UnsupportedError(f"GGUF export supports the families {', '.join(ARCH_OF_FAMILY)}; got {cfg.family!r}")
    if abs(cfg.query_scale - cfg.head_dim ** -0.5) > 1e-9:  # llama.cpp scales queries by head_dim ** -0.5
        raise UnsupportedError(f"GGUF export: a query scale of {cfg.query_scale:.6g} (not head_dim ** -0.5) has no "
                               f"{arch} GGUF key")
    if arch == "gemma3":
        expected = ["sliding_attention" if (i + 1) % SLIDING_PATTERN else "full_attention" for i in range(cfg.n_layers)]
        if cfg.layer_types != expected:
            raise UnsupportedError("GGUF export: llama.cpp's Gemma 3 makes every 6th layer global; this model's "
                                   "layer_types differ")
    if arch in ("llama", "qwen2") and (cfg.norm != "rmsnorm" or cfg.mlp != "gated" or cfg.parallel_residual):
        raise UnsupportedError(f"GGUF export: a {arch} model must use RMSNorm and a gated MLP")
    return arch


def architecture_metadata(cfg: ModelConfig, arch: str, name: str, quant: str) -> dict[str, Any]:
    a = arch
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": name,
        "general.file_type": Typed(FILE_TYPES[quant], UINT32),
        "general.quantization_version": Typed(2, UINT32),
        f"{a}.context_length": cfg.max_position_embeddings,
        f"{a}.embedding_length": cfg.hidden_size,
        f"{a}.block_count": cfg.n_layers,
        f"{a}.feed_forward_length": cfg.intermediate_size,
        f"{a}.attention.head_count": cfg.n_heads,
        f"{a}.attention.head_count_kv": cfg.n_kv_heads,
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim,
        f"{a}.rope.freq_base": Typed(float(cfg.rope_theta), FLOAT32),
        f"{a}.rope.dimension_count": cfg.rotary_dim,
    }
    eps_key = "layer_norm_epsilon" if cfg.norm == "layernorm" else "layer_norm_rms_epsilon"
    meta[f"{a}.attention.{eps_key}"] = Typed(float(cfg.norm_eps), FLOAT32)
    if cfg.rope_scaling_factor != 1.0:
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = Typed(float(cfg.rope_scaling_factor), FLOAT32)
    if arch == "gemma3":
        meta[f"{a}.attention.sliding_window"] = cfg.sliding_window
        meta[f"{a}.rope.local.freq_base"] = Typed(float(cfg.rope_local_theta), FLOAT32)
    return meta


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in Q4_K_M."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int, tied: bool) -> str:
    """The GGML type of tensor ``name`` in a ``quant`` export (see the module docstring)."""
    if len(shape) < 2:
        return "F32"
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    if quant == "f16":
        kind = "F16"
    elif quant == "q8_0":
        kind = "Q8_0"
    elif output:
        kind = "Q6_K"
    elif quant == "q4_0":
        kind = "Q4_0"
    else:
        kind = "Q4_K"
        if name.endswith(("attn_v.weight", "ffn_down.weight")):
            layer = int(name.split(".")[1])
            kind = "Q6_K" if use_more_bits(layer, n_layers) else "Q4_K"
    width = shape[-1]
    if kind in FALLBACK and width % 256:
        kind = FALLBACK[kind]
    if width % block_size(kind):
        kind = "F16"
    return kind


def _converter(cfg: ModelConfig, arch: str, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float()
        if arch == "llama" and key.endswith(("attn.q.weight", "attn.q.bias")):
            t = permute_qk(t, cfg.n_heads)
        elif arch == "llama" and key.endswith(("attn.k.weight", "attn.k.bias")):
            t = permute_qk(t, cfg.n_kv_heads)
        if cfg.norm_unit_offset and key.endswith("norm.weight"):
            t = t + 1.0
        return t
    return convert


def export_gguf(lm, path: str | Path, quant: str = "f16", name: str | None = None,
                progress: bool = True) -> Path:
    """Write ``lm`` (an ``slmkit.LM``) as a GGUF file at ``path`` in ``quant`` (one of ``QUANTS``)."""
    if quant not in QUANTS:
        raise SlmError(f"unknown GGUF export type {quant!r}; choose one of {', '.join(QUANTS)}")
    path = Path(path)
    if path.suffix != ".gguf":
        raise SlmError(f"{path}: the output file must end in .gguf")
    cfg: ModelConfig = lm.config
    arch = check_exportable(cfg)
    source = Path(str(lm.source))
    meta = architecture_metadata(cfg, arch, name or source.stem, quant)
    if source.is_file() and source.suffix == ".gguf":
        meta.update(copied_tokenizer_metadata(GGUFFile(source).metadata))
    else:
        meta.update(tokenizer_metadata(lm.tokenizer, cfg.vocab_size))

    weights = lm.float_weights("export")
    entries = []
    for key in weights.keys():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        target = slm_to_gguf(key)
        if target is None:
            raise UnsupportedError(f"GGUF export: no GGUF name for the weight {key!r}")
        shape = tuple(weights[key].shape)
        kind = tensor_type(target, shape, quant, cfg.n_layers, cfg.tie_word_embeddings)
        convert = _converter(cfg, arch, key)
        entries.append(TensorEntry(target, shape, kind,
                                   lambda key=key, convert=convert, kind=kind: quantize(convert(weights[key]), kind)))
    entries.sort(key=_file_order)
    bar = _progress_bar(entries, path) if progress else None
    try:
        return write_gguf(path, meta, entries, progress=(lambda e: bar.update(e.nbytes)) if bar else None)
    finally:
        if bar is not None:
            bar.close()


def _file_order(entry: TensorEntry) -> tuple:
    parts = entry.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), entry.name)
    return (0 if parts[0] == "token_embd" else 2, 0, entry.name)


def _progress_bar(entries: list[TensorEntry], path: Path):
    from tqdm.auto import tqdm

    return tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc=f"export {path.name}",
                file=sys.stderr)
