"""Decoder language models: ``load_decoder`` (a ``.gguf`` file, a Hugging Face folder or a compact folder) and
the ``LM`` object it returns. ``slmkit.load`` (the package) picks this family for every checkpoint that is not
an encoder or an encoder-decoder."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..config import ModelConfig
from ..engine.constrain import ConstraintCache
from ..engine.generate import Completion, TextEvent, generate, iter_generate
from ..engine.prompt_cache import PromptCache
from ..engine.sampling import SamplingParams
from ..errors import SlmError
from ..formats.gguf import GGUFFile
from ..formats.gguf_model import file_quant, open_gguf_model
from ..formats.compact import build_compact, compact_state, is_compact, read_compact, write_compact
from ..formats.hf import read_hf_config, read_hf_json, read_hf_state_dict, write_hf
from ..models.build import build_decoder
from ..models.decoder import Decoder
from ..nn.quant import check_mode
from ..tokenizer import Tokenizer
from .common import describe_tokenizer, dtype_name, resolve_dtype, tensor_dtypes


class LM:
    """A loaded model with its tokenizer: generate, chat, score, save."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, source: str, tensor_types: dict[str, str]):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.config: ModelConfig = model.cfg
        self.tensor_types = tensor_types  # tensor name -> storage type in the source file
        self.constraints = ConstraintCache()  # compiled regex / JSON schema constraints, by their text

    # ------------------------------------------------------------ generation
    def _params(self, regex: str | None = None, json_schema=None, response_format=None, **kw) -> SamplingParams:
        """Sampling parameters from the keywords every generation method takes; ``regex=``, ``json_schema=`` or
        ``response_format=`` (OpenAI's shape) constrain the output (see engine.constrain), through a logits
        processor made for this call and run after any given in ``logits_processors``."""
        params = SamplingParams(**kw)
        given = [name for name, value in (("regex", regex), ("json_schema", json_schema),
                                          ("response_format", response_format)) if value is not None]
        if len(given) > 1:
            raise SlmError(f"give one of regex=, json_schema=, response_format=, not {' and '.join(given)}")
        if regex is not None:
            constraint = self.constraints.regex(regex)
        elif json_schema is not None:
            constraint = self.constraints.json_schema(json_schema)
        else:
            constraint = self.constraints.response_format(response_format)
        if constraint is not None:
            params.logits_processors += (constraint.processor(self.tokenizer, self.eos_ids),)
        return params

    @property
    def eos_ids(self) -> set[int]:
        return set(self.tokenizer.eos_ids) | set(self.config.eos_ids)

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(p) for p in prompts]

    def complete(self, prompts: Sequence[str], prompt_cache: PromptCache | None = None,
                 **sampling) -> list[Completion]:
        """Completions (text, token ids, finish reason) for a batch of prompts. ``prompt_cache``: a
        ``PromptCache`` that keeps the keys/values of the prefix the prompts share between calls (many
        questions behind one long context pay for that context once)."""
        return generate(self.model, self.tokenizer, self._encode_prompts(prompts), self._params(**sampling),
                        self.eos_ids, prompt_cache=prompt_cache)

    def generate(self, prompt: str | Sequence[str], **sampling) -> str | list[str]:
        """Continue ``prompt`` (or each of a list of prompts, batched with left padding). Every generation
        method takes the sampling keywords (``max_new_tokens``, ``temperature``, ...) and ``regex=`` /
        ``json_schema=`` / ``response_format=`` to constrain the output."""
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
        if stream:
            return self._stream_ids(self._chat_ids(messages), **sampling)
        return self.complete_chats([messages], **sampling)[0].text

    def complete_chats(self, conversations: Sequence[list[dict]], prompt_cache: PromptCache | None = None,
                       **sampling) -> list[Completion]:
        """The assistant's replies to a batch of conversations (left-padded, as ``complete``)."""
        ids = [self._chat_ids(messages) for messages in conversations]
        return generate(self.model, self.tokenizer, ids, self._params(**sampling), self.eos_ids,
                        prompt_cache=prompt_cache)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        # the rendered template already holds any BOS the checkpoint wants: no special tokens added
        return self.tokenizer.encode(self.chat_prompt(messages), add_special_tokens=False)

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

    def export_gguf(self, path: str | Path, quant: str = "f16", name: str | None = None,
                    progress: bool = True) -> Path:
        """Write the model as a GGUF file for llama.cpp / Ollama (``quant``: f16, q8_0, q4_0, q4_k_m); see
        ``formats.gguf_export``."""
        from ..formats.gguf_export import export_gguf

        return export_gguf(self, path, quant=quant, name=name, progress=progress)

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
        return model_info(self.config, self.tokenizer, self.source, self.tensor_types, dtype_name(self.model.dtype),
                          self.model.quant)


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


def _tensor_group(name: str) -> str:
    """``blk.3.attn_q.weight`` / ``model.layers.3.self_attn.q_proj.weight`` -> ``attn_q.weight`` style groups."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0] + 1:]) if digits else name


def describe_gguf(path: str | Path) -> dict:
    """``model_info`` of a GGUF file, from its header (no weights are read)."""
    path = Path(path)
    gguf = GGUFFile(path)
    cfg, _ = open_gguf_model(gguf)
    types = {n: info.type_name for n, info in gguf.tensors.items()}
    mode, kind = file_quant(gguf)
    return model_info(cfg, Tokenizer.from_gguf_metadata(gguf.metadata), str(path), types, "float32",
                      f"{mode} (the default for this file's {kind})" if mode != "none" else "none")


def load_decoder(path: str | Path, dtype: str | torch.dtype = "float32", quant: str | None = None,
                 hf_json: dict | None = None) -> LM:
    """Load a decoder from a ``.gguf`` file, a Hugging Face folder or a compact folder (``quant``: see
    ``slmkit.load``). ``hf_json``: the folder's config.json when the caller has read it already."""
    quant = "auto" if quant in (None, "auto") else check_mode(quant)
    torch_dtype = resolve_dtype(dtype)
    path = Path(path).expanduser()
    if path.is_dir():
        quant = "none" if quant == "auto" else quant  # a Hugging Face folder stays float unless asked
        hf_json = read_hf_json(path) if hf_json is None else hf_json
        if is_compact(hf_json):
            if quant != "none":  # (a default load asks for "none" here: the folder says what it is)
                raise SlmError(f"{path} is already a compact ({hf_json['quantization_config'].get('mode')}) "
                               f"checkpoint; load it without quant=")
            state = read_hf_state_dict(path, None)
            types = tensor_dtypes(state)
            model = read_compact(path, hf_json, state, torch_dtype)  # takes the layers out of state
            return LM(model, Tokenizer.from_hf_dir(path), str(path), types)
        cfg = read_hf_config(path)
        weights = read_hf_state_dict(path, cfg.family)
        tokenizer = Tokenizer.from_hf_dir(path)
        types = tensor_dtypes(weights)
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
