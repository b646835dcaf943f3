"""The Python API: ``slmkit.load(name_or_path)`` and the model objects it returns.

``load`` reads what the checkpoint is and hands it to its family's loader: ``encoder`` (BERT / RoBERTa ->
``EncoderLM``), ``seq2seq`` (T5 / Flan-T5 -> ``Seq2SeqLM``) or ``decoder`` (everything else: GGUF files,
Hugging Face and compact folders -> ``LM``). The family modules share ``common`` and never import this package,
so the imports run one way: this module -> the families -> common.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import memory
from ..errors import SlmError
from ..formats.hf import read_hf_json
from ..nn.quant import check_mode
from .common import DTYPES, describe_tokenizer, resolve_dtype, resolve_path, set_threads
from .decoder import LM, describe_gguf, load_decoder, model_info
from .encoder import EncoderLM, is_encoder_config, load_encoder, special_tokens_of
from .seq2seq import Seq2SeqLM, is_seq2seq_config, load_seq2seq

__all__ = ["DTYPES", "EncoderLM", "LM", "Seq2SeqLM", "describe", "describe_tokenizer", "is_encoder_config",
           "is_seq2seq_config", "load", "load_decoder", "load_encoder", "load_seq2seq", "model_info",
           "set_threads", "special_tokens_of"]


def load(name_or_path: str | Path, dtype: str | torch.dtype = "float32", threads: int | None = None,
         quant: str | None = None) -> LM | EncoderLM | Seq2SeqLM:
    """Load a registry name, a ``.gguf`` file, or a Hugging Face folder.

    ``quant``: by default (``None`` or ``"auto"``) a GGUF file runs in the compact form of its own quantization,
    as llama.cpp runs it (Q4_0/Q4_1/Q4_K... -> ``int4``, Q5/Q6/Q8 -> ``int8``, F16/BF16/F32 -> float; see
    ``formats.gguf_model.file_quant``) and everything else in float; ``"none"`` gives the float model, ``"int8"``
    / ``"int4"`` compact weights for fast CPU inference (see formats.compact). ``lm.info()["quantization"]``
    says which mode runs. Encoder and encoder-decoder checkpoints load in float only.
    """
    quant = "auto" if quant in (None, "auto") else check_mode(quant)
    with memory.loading():  # large temporaries go straight back to the system, then buffers are reused
        return _load(name_or_path, dtype, threads, quant)


def _load(name_or_path, dtype, threads, quant: str):
    if threads is not None:
        set_threads(threads)
    torch_dtype = resolve_dtype(dtype)
    path = resolve_path(name_or_path)
    if not path.is_dir():
        return load_decoder(path, torch_dtype, quant)  # a GGUF file
    hf_json = read_hf_json(path)
    if is_encoder_config(hf_json):  # BERT / RoBERTa
        if quant not in ("auto", "none"):
            raise SlmError(f"{path} is a {hf_json['model_type']} encoder; quant= applies to decoder models only")
        return load_encoder(path, torch_dtype)
    if is_seq2seq_config(hf_json):  # T5 / Flan-T5
        if quant not in ("auto", "none"):
            raise SlmError(f"{path} is a T5 encoder-decoder; quant= applies to decoder models only")
        return load_seq2seq(path, torch_dtype)
    return load_decoder(path, torch_dtype, quant, hf_json)


def describe(name_or_path: str | Path) -> dict:
    """``info()`` of a model; a GGUF file is described from its header, without loading its weights."""
    path = resolve_path(name_or_path)
    if path.is_file():
        return describe_gguf(path)
    return load(path).info()
