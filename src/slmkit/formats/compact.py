"""Compact checkpoints: an HF-style folder whose ``model.safetensors`` holds quantized weights.

``config.json`` carries ``quantization_config = {"quant_method": "slmkit", "mode": "int8" | "int4",
"group_size": 32}``; tensors use slmkit's key names: ``<linear>.weight_int8`` + ``.scale`` (int8),
``<linear>.codes`` (two 4-bit codes per byte, low nibble first) + ``.scale`` + ``.minimum`` (int4),
norms and biases as they are. Written by ``slm quantize``; read by ``slmkit.load``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from ..models.compact import fuse
from ..models.decoder import Decoder
from ..nn.quant import INT4_GROUP, Int4Linear, Int8Embedding, Int8Linear, check_mode, quantize_int4, quantize_int8
from .hf import write_hf

QUANT_METHOD = "slmkit"


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def compact_state(model: Decoder, mode: str) -> dict[str, torch.Tensor]:
    """Quantized tensors for a float ``model`` (fused q|k|v and gate|up), in slmkit key names."""
    mode = check_mode(mode)
    model = fuse(copy.deepcopy(model))  # the caller's model keeps its unfused (HF-mappable) layout
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach()
        if mode == "int8":
            state[f"{name}.weight_int8"], state[f"{name}.scale"] = quantize_int8(w)
        else:
            codes, state[f"{name}.scale"], state[f"{name}.minimum"] = quantize_int4(w)
            state[f"{name}.codes"] = _pack_nibbles(codes)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().float()
    # one int8 table for the embedding, and for the head when tied
    state["embed.weight_int8"], state["embed.scale"] = quantize_int8(model.embed.weight.detach())
    if model.lm_head is not None:
        state["lm_head.weight_int8"], state["lm_head.scale"] = quantize_int8(model.lm_head.weight.detach())
        if model.lm_head.bias is not None:
            state["lm_head.bias"] = model.lm_head.bias.detach().float()
    for name, p in model.named_parameters():
        if "norm" in name:
            state[name] = p.detach().float()
    return state


def write_compact(folder: str | Path, model: Decoder, tokenizer, mode: str) -> Path:
    cfg = model.cfg
    state = compact_state(model, mode)
    extra = {"quantization_config": {"quant_method": QUANT_METHOD, "mode": mode, "group_size": INT4_GROUP}}
    return write_hf(folder, cfg, state, tokenizer, raw_state=True, extra_config=extra)


def is_compact(hf_config: dict) -> bool:
    return (hf_config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def build_compact(cfg: ModelConfig, state: dict[str, torch.Tensor], mode: str, dtype: torch.dtype,
                  source: str) -> Decoder:
    model = Decoder(cfg).to(dtype)
    fuse(model)
    try:
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or name == "lm_head":
                continue
            bias = state.get(f"{name}.bias")
            if mode == "int8":
                new = Int8Linear(state[f"{name}.weight_int8"], state[f"{name}.scale"].float(), bias)
            else:
                codes = _unpack_nibbles(state[f"{name}.codes"])
                new = Int4Linear(codes, state[f"{name}.scale"], state[f"{name}.minimum"], bias)
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
        model.load_state_dict(norms, strict=False)
    except KeyError as e:
        raise ModelFileError(f"{source}: compact checkpoint is missing tensor {e}") from None
    model.quant = mode
    return model.eval()


def read_compact(folder: Path, hf_config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Decoder:
    cfg = ModelConfig.from_hf(hf_config)
    mode = check_mode(hf_config["quantization_config"].get("mode"))
    return build_compact(cfg, state, mode, dtype, str(folder))
