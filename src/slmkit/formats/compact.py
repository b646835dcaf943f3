"""Compact checkpoints: an HF-style folder whose ``model.safetensors`` holds quantized weights.

``config.json`` carries ``quantization_config = {"quant_method": "slmkit", "mode": "int8" | "int4",
"group_size": 32}``; tensors use slmkit's key names: ``<linear>.weight_int8`` + ``.scale`` (int8),
``<linear>.codes`` (two 4-bit codes per byte, low nibble first) + ``.scale`` + ``.minimum`` (int4),
norms and biases as they are. Written by ``slm quantize``; read by ``slmkit.load``.

Loading a GGUF compact, int4 takes Q4_1 tensors as the file stores them (``<linear>.codes_blocked``, the
kernels' layout, in memory only): the same values llama.cpp multiplies, and no dequantize / requantize pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from ..models.build import skeleton
from ..models.compact import fuse
from ..models.decoder import Decoder
from ..nn.rope import interleave_permutation, inv_frequencies
from ..nn.quant import (INT4_GROUP, Int4Linear, Int8Embedding, Int8Linear, check_mode, natural_layout, quantize_int4,
                        quantize_int8)
from .hf import write_hf

QUANT_METHOD = "slmkit"


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _fused_linears(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(module name in the fused model, the unfused weights it concatenates) for every layer linear."""
    out = []
    for i in range(cfg.n_layers):
        attn, mlp = f"layers.{i}.attn", f"layers.{i}.mlp"
        out.append((f"{attn}.qkv", [f"{attn}.q", f"{attn}.k", f"{attn}.v"]))
        out.append((f"{attn}.o", [f"{attn}.o"]))
        if cfg.mlp == "gated":
            out.append((f"{mlp}.gate_up", [f"{mlp}.gate", f"{mlp}.up"]))
        else:
            out.append((f"{mlp}.up", [f"{mlp}.up"]))
        out.append((f"{mlp}.down", [f"{mlp}.down"]))
    return out


def _int8_table(weights, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 of a big table, a block of rows at a time when the source can stream rows."""
    if not hasattr(weights, "row_chunks"):
        return quantize_int8(weights[key])
    q_parts, scale_parts, total = [], [], 0
    for chunk in weights.row_chunks(key, rows=1024):
        q, scale = quantize_int8(chunk)
        q_parts.append(q)
        scale_parts.append(scale)
        total += len(q)
    # one table, filled part by part and each part freed as it is copied: never the whole table twice
    table = torch.empty((total, q_parts[0].shape[1]), dtype=torch.int8)
    row = 0
    while q_parts:
        part = q_parts.pop(0)
        table[row:row + len(part)] = part
        row += len(part)
        del part
    return table, torch.cat(scale_parts)


def can_interleave_rope(cfg: ModelConfig) -> bool:
    """Interleaved q/k rows (see nn.rope) need full-width RoPE, no q/k norms and one RoPE table."""
    return cfg.rotary_dim == cfg.head_dim and not cfg.qk_norm and cfg.sliding_window == 0


def _interleaved(key: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """``t`` with the rows of each q/k head reordered into (i, i + d/2) pairs; other tensors as they are."""
    if not key.endswith(("attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias")):
        return t
    heads = t.shape[0] // cfg.head_dim
    rows = t.reshape(heads, cfg.head_dim, -1)[:, interleave_permutation(cfg.head_dim)]
    return rows.reshape(t.shape)


def compact_state(cfg: ModelConfig, weights, mode: str, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Quantized tensors, in the fused layout's key names, from float ``weights`` (any mapping
    slmkit key -> tensor; a lazy one keeps only one float tensor alive at a time)."""
    try:
        return _compact_state(cfg, weights, check_mode(mode))
    except KeyError as e:
        raise ModelFileError(f"{source}: weights do not match the architecture: missing tensor {e}") from None


@torch.no_grad()
def _compact_state(cfg: ModelConfig, weights, mode: str) -> dict[str, torch.Tensor]:
    interleave = can_interleave_rope(cfg)

    def fetch(key: str) -> torch.Tensor:
        t = weights[key].float()
        return _interleaved(key, t, cfg) if interleave else t

    def stored_groups(key: str):
        """A weight kept in the file's own 4-bit groups (GGUF Q4_1 is int4's form exactly), or None."""
        groups = weights.q4_1_groups(key) if hasattr(weights, "q4_1_groups") else None
        return None if groups is None else [_interleaved(key, t, cfg) if interleave else t for t in groups]

    state: dict[str, torch.Tensor] = {}
    for name, parts in _fused_linears(cfg):
        stored = [stored_groups(f"{p}.weight") for p in parts] if mode == "int4" else [None]
        if all(g is not None for g in stored):  # as the file has them: no dequantize / requantize round trip
            codes, scale, minimum = (torch.cat(column) for column in zip(*stored))
            state[f"{name}.codes_blocked"], state[f"{name}.scale"], state[f"{name}.minimum"] = codes, scale, minimum
        else:
            w = torch.cat([fetch(f"{p}.weight") for p in parts])
            if mode == "int8":
                state[f"{name}.weight_int8"], state[f"{name}.scale"] = quantize_int8(w)
            else:
                codes, state[f"{name}.scale"], state[f"{name}.minimum"] = quantize_int4(w)
                state[f"{name}.codes"] = _pack_nibbles(codes)
            del w
        if f"{parts[0]}.bias" in weights:
            state[f"{name}.bias"] = torch.cat([fetch(f"{p}.bias") for p in parts])
    # one int8 table for the embedding, and for the head when tied
    state["embed.weight_int8"], state["embed.scale"] = _int8_table(weights, "embed.weight")
    if not cfg.tie_word_embeddings:
        state["lm_head.weight_int8"], state["lm_head.scale"] = _int8_table(weights, "lm_head.weight")
        if "lm_head.bias" in weights:
            state["lm_head.bias"] = weights["lm_head.bias"].float()
    for key in weights.keys():
        if "norm" in key:
            state[key] = weights[key].float()
    return state


def write_compact(folder: str | Path, cfg: ModelConfig, weights, tokenizer, mode: str,
                  source: str = "checkpoint") -> Path:
    state = compact_state(cfg, weights, mode, source)
    for key in [k for k in state if k.endswith(".codes_blocked")]:  # the checkpoint keeps one code layout
        state[key.replace(".codes_blocked", ".codes")] = _pack_nibbles(natural_layout(state.pop(key)))
    extra = {"quantization_config": {"quant_method": QUANT_METHOD, "mode": mode, "group_size": INT4_GROUP,
                                     "rope_layout": "interleaved" if can_interleave_rope(cfg) else "half"}}
    return write_hf(folder, cfg, state, tokenizer, raw_state=True, extra_config=extra)


def is_compact(hf_config: dict) -> bool:
    return (hf_config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def build_compact(cfg: ModelConfig, state: dict[str, torch.Tensor], mode: str, dtype: torch.dtype,
                  source: str, rope_interleaved: bool | None = None) -> Decoder:
    """The compact model for ``state`` (from :func:`compact_state`, which interleaves q/k rows when it can).
    The layers' entries are taken out of ``state`` as they are built."""
    if rope_interleaved is None:
        rope_interleaved = can_interleave_rope(cfg)
    with skeleton():
        model = fuse(Decoder(cfg))
    try:
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or name == "lm_head":
                continue
            # popped: a layer's stored form is freed once its module holds the working form (int4 repacks)
            bias = state.pop(f"{name}.bias", None)
            if mode == "int8":
                new = Int8Linear(state.pop(f"{name}.weight_int8"), state.pop(f"{name}.scale").float(), bias)
            elif f"{name}.codes_blocked" in state:  # straight from a Q4_1 file (compact_state)
                new = Int4Linear.from_blocked(state.pop(f"{name}.codes_blocked"), state.pop(f"{name}.scale"),
                                              state.pop(f"{name}.minimum"), bias)
            else:
                codes = _unpack_nibbles(state.pop(f"{name}.codes"))
                new = Int4Linear(codes, state.pop(f"{name}.scale"), state.pop(f"{name}.minimum"), bias)
                del codes
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
        table = Int8Linear(state["embed.weight_int8"], state["embed.scale"].float(), None)
        model.embed = Int8Embedding(table)
        if cfg.tie_word_embeddings:
            model.lm_head = table
        else:
            model.lm_head = Int8Linear(state["lm_head.weight_int8"], state["lm_head.scale"].float(),
                                       state.get("lm_head.bias"))
        norms = {k: v.to(dtype) for k, v in state.items() if "norm" in k}
        missing = [k for k, _ in model.named_parameters() if "norm" in k and k not in norms]
        if missing:
            raise KeyError(missing[0])
        model.load_state_dict(norms, strict=False, assign=True)
        for layer in model.layers:
            layer.attn.rope_interleaved = rope_interleaved
        model.inv_freq = inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_factor)
        model.inv_freq_local = inv_frequencies(cfg.rotary_dim, cfg.rope_local_theta)
    except KeyError as e:
        raise ModelFileError(f"{source}: compact checkpoint is missing tensor {e}") from None
    model.quant = mode
    return model.eval()


def read_compact(folder: Path, hf_config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Decoder:
    cfg = ModelConfig.from_hf(hf_config)
    qc = hf_config["quantization_config"]
    mode = check_mode(qc.get("mode"))
    return build_compact(cfg, state, mode, dtype, str(folder), qc.get("rope_layout", "half") == "interleaved")
