"""Hugging Face folders: config.json + safetensors (single or sharded) + tokenizer files, in and out."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import ModelFileError
from .keys import hf_to_slm, slm_to_hf


def read_hf_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFileError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: invalid JSON ({e})") from None


def read_hf_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(read_hf_json(folder))
    except KeyError as e:
        raise ModelFileError(f"{folder / 'config.json'}: missing required field {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelFileError(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise ModelFileError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")


def read_hf_state_dict(folder: Path, family: str | None) -> dict[str, torch.Tensor]:
    """All weights of the folder, renamed to slmkit's keys (``family=None``: names kept as stored)."""
    state = {}
    for f in _weight_files(folder):
        try:
            tensors = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelFileError(f"{f}: cannot read weights ({str(e).splitlines()[0]})") from None
        for k, v in tensors.items():
            if v.data_ptr() % 64:  # safetensors >= 0.8 maps tensors at any file offset; some CPU kernels
                v = v.clone()      # (int8/int4 weight-only matmuls) crash on memory that is not 64-byte aligned
            state[k if family is None else hf_to_slm(k, family)] = v
    return state


def write_folder_atomically(folder: str | Path, fill) -> Path:
    """``fill(tmp)`` writes every file into a temporary sibling folder, which then replaces ``folder``:
    a crash or an error never leaves a half-written folder that looks complete."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelFileError(f"{folder}: exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fill(tmp)
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(folder, backup)
            os.replace(tmp, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_hf(folder: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer=None,
             generation_config: dict | None = None, raw_state: bool = False, extra_config: dict | None = None) -> Path:
    """Write an HF folder atomically (see :func:`write_folder_atomically`).

    ``raw_state`` keeps slmkit's key names (compact checkpoints, which transformers cannot read anyway).
    """
    rename = (lambda k: k) if raw_state else (lambda k: slm_to_hf(k, cfg.family))
    hf_state = {rename(k): v.detach().contiguous().cpu() for k, v in state.items()
                if raw_state or not (cfg.tie_word_embeddings and k.startswith("lm_head."))}

    def fill(tmp: Path) -> None:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = cfg.to_hf()
        hf_cfg["dtype"] = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
        hf_cfg.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
               **(generation_config or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)

    return write_folder_atomically(folder, fill)
