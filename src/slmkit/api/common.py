"""What the model families of ``slmkit.api`` share: dtype names, path resolution, tokenizer and tensor-type
descriptions, optional JSON side files. Imports nothing from the family modules or the package."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ModelFileError, SlmError
from ..formats.registry import REGISTRY, resolve
from ..tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, known_only: bool = False) -> torch.dtype:
    """A dtype name from ``DTYPES`` (or a torch dtype) -> the torch dtype. ``known_only``: a torch dtype must
    be one of ``DTYPES``' too."""
    torch_dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype) or (known_only and torch_dtype not in DTYPES.values()):
        raise SlmError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return torch_dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).replace("torch.", "")


def tensor_dtypes(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tensor name -> its dtype name, for the ``tensor_types`` a loaded model reports."""
    return {k: dtype_name(v.dtype) for k, v in state.items()}


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    backend = tokenizer.backend
    model = type(backend.model).__name__
    pre = type(backend.pre_tokenizer).__name__ if backend.pre_tokenizer is not None else "none"
    return f"{model}, {tokenizer.vocab_size} tokens, pre-tokenizer {pre}"


def read_optional_json(path: Path) -> dict:
    """A side file such as generation_config.json: its JSON, or ``{}`` when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: invalid JSON ({e})") from None


def resolve_path(name_or_path: str | Path) -> Path:
    """A registry name, file or folder -> the file or folder to read (a folder holding one .gguf -> that file)."""
    name = str(name_or_path)
    path = resolve(name) if name in REGISTRY else Path(name).expanduser()
    if not path.exists():
        known = ", ".join(REGISTRY)
        raise ModelFileError(f"{name}: no such file or folder, and not a registry name ({known})")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            path = ggufs[0]
    return path


def set_threads(threads: int | None) -> None:
    n = threads or os.cpu_count() or 1
    if n < 1:
        raise SlmError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n)
