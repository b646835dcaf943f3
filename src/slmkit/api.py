"""The Python API: ``slmkit.load(name_or_path)`` and the ``LM`` object it returns."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import memory
from .config import ModelConfig
from .encoder_api import EncoderLM, is_encoder_config, load_encoder
from .seq2seq_api import Seq2SeqLM, is_seq2seq_config, load_seq2seq
from .engine.generate import Completion, TextEvent, generate, iter_generate
from .engine.sampling import SamplingParams
from .errors import ModelFileError, SlmError
from .formats.gguf import GGUFFile
from .formats.gguf_model import file_quant, open_gguf_model
from .formats.compact import build_compact, compact_state, is_compact, read_compact, write_compact
from .formats.hf import read_hf_config, read_hf_json, read_hf_state_dict, write_hf
from .formats.registry import REGISTRY, resolve
from .models.build import build_decoder
from .models.decoder import Decoder
from .nn.quant import check_mode
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class LM:
    """A loaded model with its tokenizer: generate, chat, score, save."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, source: str, tensor_types: dict[str, str]):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.config: ModelConfig = model.cfg
        self.tensor_types = tensor_types  # tensor name -> storage type in the source file

    # ------------------------------------------------------------ generation
    def _params(self, **kw) -> SamplingParams:
        return SamplingParams(**kw)

    @property
    def eos_ids(self) -> set[int]:
        return set(self.tokenizer.eos_ids) | set(self.config.eos_ids)

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(p) for p in prompts]

    def complete(self, prompts: Sequence[str], **sampling) -> list[Completion]:
        """Completions (text, token ids, finish reason) for a batch of prompts."""
        return generate(self.model, self.tokenizer, self._encode_prompts(prompts), self._params(**sampling),
                        self.eos_ids)

    def generate(self, prompt: str | Sequence[str], **sampling) -> str | list[str]:
        """Continue ``prompt`` (or each of a list of prompts, batched with left padding)."""
        single = isinstance(prompt, str)
        done = self.complete([prompt] if single else list(prompt), **sampling)
        return done[0].text if single else [c.text for c in done]

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is generated."""
        return self._stream_ids(self.prompt_ids(prompt), **sampling)

    def prompt_ids(self, text: str, chat: bool = False) -> list[int]:
        """The token ids generation starts from: ``text`` as it is, or (``chat``) as one user message rendered
        with the model's chat template."""
        if chat:
            return self.tokenizer.encode(self.chat_prompt([{"role": "user", "content": text}]),
                                         add_special_tokens=False)
        return self.tokenizer.encode(text)

    def events(self, ids: list[int], **sampling) -> Iterator[TextEvent]:
        """Generation from ``ids`` as events: text pieces, and the finished Completion on the last one."""
        return iter_generate(self.model, self.tokenizer, [ids], self._params(**sampling), self.eos_ids)

    def chat_prompt(self, messages: list[dict], **template_kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)

    def chat(self, messages: list[dict], stream: bool = False, **sampling):
        """The assistant's reply to ``messages``, rendered with the model's own chat template."""
        prompt = self.chat_prompt(messages)
        if stream:
            return self._stream_ids(self.tokenizer.encode(prompt, add_special_tokens=False), **sampling)
        ids = [self.tokenizer.encode(prompt, add_special_tokens=False)]
        return generate(self.model, self.tokenizer, ids, self._params(**sampling), self.eos_ids)[0].text

    def _stream_ids(self, ids: list[int], **sampling) -> Iterator[str]:
        for ev in self.events(ids, **sampling):
            if ev.delta:
                yield ev.delta

    # --------------------------------------------------------------- scoring
    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """Logits [batch, time, vocab] (float32) for token ids: a list, a list of equal-length lists, or a tensor."""
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            if len({len(row) for row in token_ids}) > 1:
                raise SlmError("lm.logits needs rows of equal length; score ragged rows one at a time")
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[-1] > self.config.max_position_embeddings:
            raise SlmError(f"{ids.shape[-1]} tokens exceed the model's context of "
                           f"{self.config.max_position_embeddings}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise SlmError(f"token ids must be in [0, {self.config.vocab_size}); got {ids.min()}..{ids.max()}")
        return self.model(ids.to(self.model.device)).float()

    # ----------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        """Write the model in Hugging Face layout (safetensors, config.json, tokenizer files). A compact model
        loaded from a GGUF file writes the file's weights dequantized to float32 (and says so)."""
        weights = self.float_weights("save")
        return write_hf(folder, self.config, {key: weights[key] for key in weights.keys()}, self.tokenizer)

    def save_compact(self, folder: str | Path, mode: str = "int8") -> Path:
        """Write a compact (int8 / int4) checkpoint that ``slmkit.load`` reads back quantized."""
        return write_compact(folder, self.config, self.float_weights("save_compact"), self.tokenizer, mode,
                             self.source)

    def float_weights(self, purpose: str):
        """The float weights (a mapping with slmkit key names): the model's own, or -- for a compact model loaded
        from a GGUF file -- the file's, read again and dequantized lazily, tensor by tensor (a note on stderr
        says so)."""
        if self.model.quant == "none":
            return self.model.state_dict()
        source = Path(self.source)
        if not (source.is_file() and source.suffix == ".gguf"):
            raise SlmError(f"{purpose}: {self.source} is a compact ({self.model.quant}) checkpoint and holds no "
                           "float weights; start from the float model")
        print(f"slmkit: {purpose} takes the float weights of {source.name} (dequantized from the file; the "
              f"loaded model runs them as {self.model.quant})", file=sys.stderr)
        return open_gguf_model(GGUFFile(source))[1]

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def info(self) -> dict:
        return model_info(self.config, self.tokenizer, self.source, self.tensor_types,
                          str(self.model.dtype).replace("torch.", ""), self.model.quant)


def model_info(cfg: ModelConfig, tokenizer: Tokenizer, source: str, tensor_types: dict[str, str],
               compute_dtype: str, quant: str) -> dict:
    """What ``slm info`` prints: architecture, size, storage types per tensor group, tokenizer."""
    groups: Counter = Counter()
    for name, kind in tensor_types.items():
        groups[(_tensor_group(name), kind)] += 1
    eos = set(tokenizer.eos_ids) | set(cfg.eos_ids)
    return {
        "source": source,
        "family": cfg.family,
        "layers": cfg.n_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.n_heads} query / {cfg.n_kv_heads} key-value, head_dim {cfg.head_dim}",
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "tied_embeddings": cfg.tie_word_embeddings,
        "parameters": cfg.num_parameters(),
        "compute_dtype": compute_dtype,
        "quantization": quant,
        "tensor_types": {f"{g} [{k}]": n for (g, k), n in sorted(groups.items())},
        "tokenizer": describe_tokenizer(tokenizer),
        "chat_template": tokenizer.chat_template is not None,
        "bos_id": tokenizer.bos_id,
        "eos_ids": sorted(eos),
    }


def describe(name_or_path: str | Path) -> dict:
    """``model_info`` of a model without loading its weights (a GGUF is described from its header)."""
    path = _resolve_path(name_or_path)
    if path.is_file():
        gguf = GGUFFile(path)
        cfg, _ = open_gguf_model(gguf)
        types = {n: info.type_name for n, info in gguf.tensors.items()}
        mode, kind = file_quant(gguf)
        return model_info(cfg, Tokenizer.from_gguf_metadata(gguf.metadata), str(path), types, "float32",
                          f"{mode} (the default for this file's {kind})" if mode != "none" else "none")
    return load(path).info()


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    backend = tokenizer.backend
    model = type(backend.model).__name__
    pre = type(backend.pre_tokenizer).__name__ if backend.pre_tokenizer is not None else "none"
    return f"{model}, {tokenizer.vocab_size} tokens, pre-tokenizer {pre}"


def _tensor_group(name: str) -> str:
    """``blk.3.attn_q.weight`` / ``model.layers.3.self_attn.q_proj.weight`` -> ``attn_q.weight`` style groups."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0] + 1:]) if digits else name


def _resolve_path(name_or_path: str | Path) -> Path:
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


def load(name_or_path: str | Path, dtype: str | torch.dtype = "float32", threads: int | None = None,
         quant: str | None = None) -> "LM | EncoderLM | Seq2SeqLM":
    """Load a registry name, a ``.gguf`` file, or a Hugging Face folder.

    ``quant``: by default (``None`` or ``"auto"``) a GGUF file runs in the compact form of its own quantization,
    as llama.cpp runs it (Q4_0/Q4_1/Q4_K... -> ``int4``, Q5/Q6/Q8 -> ``int8``, F16/BF16/F32 -> float; see
    ``formats.gguf_model.file_quant``) and everything else in float; ``"none"`` gives the float model, ``"int8"``
    / ``"int4"`` compact weights for fast CPU inference (see formats.compact). ``lm.info()["quantization"]``
    says which mode runs.
    """
    quant = "auto" if quant in (None, "auto") else check_mode(quant)
    with memory.loading():  # large temporaries go straight back to the system, then buffers are reused
        return _load(name_or_path, dtype, threads, quant)


def _load(name_or_path, dtype, threads, quant: str):
    if threads is not None:
        set_threads(threads)
    torch_dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if torch_dtype is None:
        raise SlmError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    path = _resolve_path(name_or_path)
    if path.is_dir():
        quant = "none" if quant == "auto" else quant  # a Hugging Face folder stays float unless asked
        hf_json = read_hf_json(path)
        if is_encoder_config(hf_json):  # BERT / RoBERTa
            if quant != "none":
                raise SlmError(f"{path} is a {hf_json['model_type']} encoder; quant= applies to decoder models only")
            return load_encoder(path, torch_dtype)
        if is_seq2seq_config(hf_json):  # T5 / Flan-T5
            if quant != "none":
                raise SlmError(f"{path} is a T5 encoder-decoder; quant= applies to decoder models only")
            return load_seq2seq(path, torch_dtype)
        if is_compact(hf_json):
            if quant != "none":  # (a default load asks for "none" here: the folder says what it is)
                raise SlmError(f"{path} is already a compact ({hf_json['quantization_config'].get('mode')}) "
                               f"checkpoint; load it without quant=")
            state = read_hf_state_dict(path, None)
            types = {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}
            model = read_compact(path, hf_json, state, torch_dtype)  # takes the layers out of state
            return LM(model, Tokenizer.from_hf_dir(path), str(path), types)
        cfg = read_hf_config(path)
        weights = read_hf_state_dict(path, cfg.family)
        tokenizer = Tokenizer.from_hf_dir(path)
        types = {k: str(v.dtype).replace("torch.", "") for k, v in weights.items()}
    else:
        gguf = GGUFFile(path)
        cfg, weights = open_gguf_model(gguf)  # lazy: each tensor is dequantized when asked for
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        types = {n: info.type_name for n, info in gguf.tensors.items()}
        if quant == "auto":  # the file's own quantization; a float compute dtype other than float32 stays float
            quant = file_quant(gguf)[0] if torch_dtype == torch.float32 else "none"
    if quant != "none":  # quantized tensor by tensor: the float model never exists whole
        model = build_compact(cfg, compact_state(cfg, weights, quant, str(path)), quant, torch_dtype, str(path))
    else:
        model = build_decoder(cfg, {k: weights[k].to(torch_dtype) for k in weights.keys()}, torch_dtype,
                              source=str(path))
    return LM(model, tokenizer, str(path), types)
