"""``load_encoder(folder)`` and the ``EncoderLM`` it returns: a BERT / RoBERTa checkpoint with its tokenizer.

What it does with text: sentence embeddings (mean pooling over the attention mask, then L2
normalisation: the sentence-transformers recipe of all-MiniLM-L6-v2), masked-LM logits and
sequence-classification logits; ``save`` writes the Hugging Face layout back, atomically.

Tokenization follows transformers: tokenizer.json's post-processor adds ``[CLS] ... [SEP]`` /
``<s> ... </s>``; inputs longer than the model allows are truncated (longest first for pairs) and
batches are right-padded with the pad token. A tokenizer.json that pins padding or truncation
(MiniLM's pads everything to 128) has both switched off, as transformers does for every call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import tokenizers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..errors import ModelFileError, SlmError, UnsupportedError
from ..formats.hf import read_hf_json, read_hf_state_dict, write_folder_atomically
from ..models.encoder import (EncoderConfig, EncoderModel, encoder_state_for_hf, hf_architecture,
                              load_encoder_state, mean_pool)
from ..tokenizer import Tokenizer
from .common import describe_tokenizer, dtype_name, read_optional_json, resolve_dtype, tensor_dtypes

ENCODER_MODEL_TYPES = ("bert", "roberta")
_POOLINGS = ("mean", "cls")
_EXTRA_SPECIAL = ("cls_token", "sep_token", "mask_token")


class EncoderLM:
    """A loaded encoder with its tokenizer: embed, mlm_logits, classify, save."""

    def __init__(self, model: EncoderModel, tokenizer: Tokenizer, source: str, tensor_types: dict[str, str],
                 special_tokens: dict[str, str] | None = None, embed_max_length: int | None = None,
                 pooling: str = "mean"):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.config: EncoderConfig = model.cfg
        self.tensor_types = tensor_types  # tensor name -> storage dtype in the source file
        self.special_tokens = dict(special_tokens or {})  # cls_token / sep_token / mask_token
        limit = self.config.max_tokens
        if tokenizer.model_max_length:
            limit = min(limit, tokenizer.model_max_length)
        self.max_length = limit  # longest input mlm_logits / classify see
        self.embed_max_length = min(embed_max_length or limit, limit)  # sentence_bert_config.json's max_seq_length
        self.pooling = pooling  # embed()'s default: from 1_Pooling/config.json, else mean
        tokenizer.backend.no_padding()
        tokenizer.backend.no_truncation()
        self._backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())  # truncates per call

    # --------------------------------------------------------------------------------------- inputs
    @property
    def mask_token(self) -> str | None:
        return self.special_tokens.get("mask_token")

    @property
    def mask_id(self) -> int | None:
        return self.tokenizer.token_to_id(self.mask_token) if self.mask_token else None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.config.pad_token_id

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
               max_length: int | None = None) -> dict[str, torch.Tensor]:
        """A right-padded batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` (``[B, T]`` each)."""
        return self._pad(self._tokenize(_as_list(texts, "texts"), pairs, max_length))

    def _tokenize(self, texts: list[str], pairs: str | Sequence[str] | None,
                  max_length: int | None) -> list[tokenizers.Encoding]:
        if not texts:
            raise SlmError("no texts given")
        if pairs is not None:
            pairs = _as_list(pairs, "pairs")
            if len(pairs) != len(texts):
                raise SlmError(f"got {len(texts)} texts but {len(pairs)} pairs; give one pair per text")
        self._backend.enable_truncation(min(max_length or self.max_length, self.max_length))
        return self._backend.encode_batch(texts if pairs is None else list(zip(texts, pairs)))

    def _pad(self, encodings: list[tokenizers.Encoding]) -> dict[str, torch.Tensor]:
        width = max(len(e.ids) for e in encodings)
        ids = torch.full((len(encodings), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), width), dtype=torch.long)
        types = torch.zeros((len(encodings), width), dtype=torch.long)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = torch.tensor(enc.ids)
            mask[row, :n] = 1
            if self.config.type_vocab_size > 1:  # RoBERTa has one token type: its pair ids are all 0
                types[row, :n] = torch.tensor(enc.type_ids)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def _batched(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], texts: list[str],
                 pairs: list[str] | None, batch_size: int, max_length: int) -> list[torch.Tensor]:
        """``fn`` on length-sorted batches; one result row per text (3-D outputs cut to the text's length)."""
        if batch_size < 1:
            raise SlmError(f"batch_size must be >= 1, got {batch_size}")
        encodings = self._tokenize(texts, pairs, max_length)
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        rows: list[torch.Tensor | None] = [None] * len(texts)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                out = fn({k: v.to(device) for k, v in self._pad([encodings[i] for i in chunk]).items()})
                for j, i in enumerate(chunk):
                    rows[i] = out[j, :len(encodings[i].ids)] if out.dim() == 3 else out[j]
        return rows  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------- outputs
    def embed(self, sentences: str | Sequence[str], batch_size: int = 32, normalize: bool = True,
              pooling: str | None = None) -> torch.Tensor:
        """Sentence embeddings ``[N, D]`` (float32): pooled last hidden states, L2-normalised by default.

        ``pooling``: ``mean`` (over the attention mask) or ``cls`` (the first token); default from the
        checkpoint's sentence-transformers pooling config, else mean. Sentences are stripped and
        truncated to ``embed_max_length`` tokens, as sentence-transformers does.
        """
        pooling = pooling or self.pooling
        if pooling not in _POOLINGS:
            raise SlmError(f"pooling must be one of {', '.join(_POOLINGS)}, got {pooling!r}")
        texts = [s.strip() for s in _as_list(sentences, "sentences")]
        if not texts:
            return torch.zeros((0, self.config.hidden_size))

        def pool(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            hidden = self.model(**batch).float()
            return mean_pool(hidden, batch["attention_mask"]) if pooling == "mean" else hidden[:, 0]

        out = torch.stack(self._batched(pool, texts, None, batch_size, self.embed_max_length)).cpu()
        return F.normalize(out, p=2, dim=-1) if normalize else out

    def mlm_logits(self, texts: str | Sequence[str], batch_size: int = 32) -> torch.Tensor | list[torch.Tensor]:
        """Masked-LM logits: ``[T, V]`` for one text, a list of them for a list (T includes [CLS]/[SEP])."""
        if self.model.mlm_head is None:
            raise UnsupportedError(f"{self.source} has no masked-LM head (it is a {hf_architecture(self.model)})")
        single = isinstance(texts, str)
        rows = self._batched(lambda b: self.model.mlm_logits(**b).float(), _as_list(texts, "texts"), None,
                             batch_size, self.max_length)
        rows = [r.cpu() for r in rows]
        return rows[0] if single else rows

    def classify(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None,
                 batch_size: int = 32) -> torch.Tensor:
        """Sequence-classification logits ``[N, num_labels]`` (labels: ``config.id2label``)."""
        if self.model.classifier is None:
            raise UnsupportedError(f"{self.source} has no classification head "
                                   f"(it is a {hf_architecture(self.model)})")
        rows = self._batched(lambda b: self.model.classify(**b).float(), _as_list(texts, "texts"),
                             None if pairs is None else _as_list(pairs, "pairs"), batch_size, self.max_length)
        return torch.stack(rows).cpu()

    # --------------------------------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        """Write an HF folder (config.json, model.safetensors, tokenizer files) that transformers opens."""
        state = {k: v.contiguous().cpu() for k, v in encoder_state_for_hf(self.model).items()}
        hf_cfg = {"architectures": [hf_architecture(self.model)], **self.config.to_hf(),
                  "dtype": dtype_name(self.model.dtype)}

        def fill(tmp: Path) -> None:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
            self.tokenizer.save(tmp)
            tok_cfg_path = tmp / "tokenizer_config.json"
            tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
            tok_cfg.update(self.special_tokens)
            tok_cfg["model_max_length"] = self.max_length
            tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            if self.embed_max_length != self.max_length:
                (tmp / "sentence_bert_config.json").write_text(
                    json.dumps({"max_seq_length": self.embed_max_length, "do_lower_case": False}, indent=2) + "\n")

        return write_folder_atomically(Path(folder), fill)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def info(self) -> dict:
        """What ``slm info`` prints for an encoder."""
        cfg = self.config
        kinds: dict[str, int] = {}
        for kind in self.tensor_types.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        return {
            "source": self.source,
            "family": cfg.family,
            "architecture": hf_architecture(self.model),
            "heads": ", ".join(self.model.heads) or "none",
            "layers": cfg.n_layers,
            "hidden_size": cfg.hidden_size,
            "heads_per_layer": f"{cfg.n_heads}, head_dim {cfg.head_dim}",
            "intermediate_size": cfg.intermediate_size,
            "activation": cfg.hidden_act,
            "vocab_size": cfg.vocab_size,
            "context_length": self.max_length,
            "embed_max_length": self.embed_max_length,
            "positions": cfg.position_style,
            "token_types": cfg.type_vocab_size,
            "num_labels": cfg.num_labels if self.model.classifier is not None else None,
            "parameters": self.num_parameters(),
            "compute_dtype": dtype_name(self.model.dtype),
            "tensor_types": kinds,
            "tokenizer": describe_tokenizer(self.tokenizer),
            "special_tokens": {k: v for k, v in {**self.tokenizer.special_tokens, **self.special_tokens}.items() if v},
        }


# ------------------------------------------------------------------------------------------- loading
def is_encoder_config(hf_config: dict) -> bool:
    """True when an HF config.json describes a model ``load_encoder`` reads."""
    return hf_config.get("model_type") in ENCODER_MODEL_TYPES


def load_encoder(path: str | Path, dtype: str | torch.dtype = "float32") -> EncoderLM:
    """Load an HF folder whose config.json has ``model_type`` bert or roberta."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a folder; an encoder loads from a Hugging Face model folder")
    torch_dtype = resolve_dtype(dtype, known_only=True)
    hf = read_hf_json(folder)
    cfg = EncoderConfig.from_hf(hf)
    state = read_hf_state_dict(folder, None)
    model = load_encoder_state(cfg, state, torch_dtype, hf.get("architectures"), source=str(folder))
    tokenizer = Tokenizer.from_hf_dir(folder)
    types = tensor_dtypes(state)
    st = read_optional_json(folder / "sentence_bert_config.json")
    pooling_cfg = read_optional_json(folder / "1_Pooling" / "config.json")
    pooling = "cls" if pooling_cfg.get("pooling_mode_cls_token") and not pooling_cfg.get("pooling_mode_mean_tokens") \
        else "mean"
    return EncoderLM(model, tokenizer, str(folder), types, special_tokens_of(folder),
                     embed_max_length=st.get("max_seq_length"), pooling=pooling)


def special_tokens_of(folder: Path) -> dict[str, str]:
    """cls / sep / mask tokens from tokenizer_config.json or special_tokens_map.json."""
    config = read_optional_json(folder / "tokenizer_config.json")
    token_map = read_optional_json(folder / "special_tokens_map.json")
    out = {}
    for name in _EXTRA_SPECIAL:
        value = config.get(name, token_map.get(name))
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _as_list(texts: str | Sequence[str], what: str) -> list[str]:
    items = [texts] if isinstance(texts, str) else list(texts)
    bad = next((t for t in items if not isinstance(t, str)), None)
    if bad is not None:
        raise SlmError(f"{what} must be strings, got {type(bad).__name__}")
    return items


