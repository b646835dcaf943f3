"""Encoder–decoder models (T5 / Flan-T5) behind a small API: ``load_seq2seq(folder)`` returns a
``Seq2SeqLM`` that generates greedily in batches (encoder run once, decoder one token per step with a
KV cache), gives teacher-forced logits, and saves an HF folder transformers opens."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from ..errors import ModelFileError, SlmError
from ..formats.hf import read_hf_json, read_hf_state_dict, write_folder_atomically
from ..models.t5 import T5, build_t5, t5_state_to_hf
from ..tokenizer import Tokenizer
from .common import describe_tokenizer, dtype_name, read_optional_json, resolve_dtype, tensor_dtypes

SEQ2SEQ_MODEL_TYPES = {"t5"}


def is_seq2seq_config(hf_json: dict) -> bool:
    """True for a config.json this module loads (``slmkit.load`` dispatches on it)."""
    return hf_json.get("model_type") in SEQ2SEQ_MODEL_TYPES


class Seq2SeqLM:
    """A loaded encoder–decoder model with its tokenizer (``None`` when the folder has none)."""

    def __init__(self, model: T5, tokenizer: Tokenizer | None, source: str, tensor_types: dict[str, str],
                 generation: dict | None = None):
        generation = generation or {}
        self.model, self.tokenizer, self.source, self.tensor_types = model, tokenizer, source, tensor_types
        self.config = model.cfg
        start = generation.get("decoder_start_token_id")
        self.decoder_start_id: int = self.config.decoder_start_token_id if start is None else int(start)
        eos = generation.get("eos_token_id")
        self.eos_ids: set[int] = set(self.config.eos_ids) | (
            set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set())

    # ---------------------------------------------------------------------------------- inputs
    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise SlmError(f"{what}: token ids must be in [0, {self.config.vocab_size}); "
                           f"got {int(ids.min())}..{int(ids.max())}")

    def _encoder_batch(self, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ragged lists are right-padded with pad_token_id; a tensor without a mask gets ``ids != pad``
        (as transformers' generate infers it) when pad differs from eos."""
        pad = self.config.pad_token_id
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids.long()
            if ids.dim() == 1:
                ids = ids[None]
            if attention_mask is None:
                attention_mask = (ids != pad) if pad not in self.eos_ids else torch.ones_like(ids)
        else:
            rows = [list(map(int, r)) for r in input_ids]
            if not rows or not isinstance(input_ids[0], (list, tuple)):
                raise SlmError("input_ids must be a tensor or a non-empty list of token-id lists")
            if attention_mask is None:
                if any(not r for r in rows):
                    raise SlmError("an input row is empty; every row needs at least one token")
                width = max(len(r) for r in rows)
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
                attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            elif len({len(r) for r in rows}) > 1:
                raise SlmError("with an attention_mask, input_ids rows must have equal length")
            else:
                ids = torch.tensor(rows, dtype=torch.long)
        mask = torch.as_tensor(attention_mask).long()
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise SlmError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        if (mask.sum(-1) == 0).any():
            raise SlmError("an input row has no unmasked token")
        self._check_ids(ids, "input_ids")
        dev = self.model.device
        return ids.to(dev), mask.to(dev)

    # ------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_ids(self, input_ids, max_new_tokens: int = 64, attention_mask=None) -> list[list[int]]:
        """Greedy continuation of each input row: the generated ids, without the decoder start token and
        without the EOS that ended a row. The encoder runs once; each step feeds one token per row."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SlmError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        ids, mask = self._encoder_batch(input_ids, attention_mask)
        model, b = self.model, ids.shape[0]
        encoder_out = model.encode(ids, mask)
        cache = model.new_cache(capacity=max_new_tokens)
        token = torch.full((b, 1), self.decoder_start_id, dtype=torch.long, device=ids.device)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        out: list[list[int]] = [[] for _ in range(b)]
        for step in range(max_new_tokens):
            logits = model.decode(token, encoder_out, mask, cache, start=step)[:, -1]
            nxt = logits.argmax(-1)
            stop = torch.isin(nxt, eos)
            for i in (~done & ~stop).nonzero().flatten().tolist():
                out[i].append(int(nxt[i]))
            done |= stop
            if bool(done.all()):
                break
            # finished rows keep feeding pad (they no longer affect the others)
            token = nxt.masked_fill(done, self.config.pad_token_id)[:, None]
        return out

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise SlmError(f"{self.source} has no tokenizer (tokenizer.json); use the token-id methods")
        return self.tokenizer

    def generate(self, texts: str | Sequence[str], max_new_tokens: int = 64) -> str | list[str]:
        """Greedy output text for one input or a batch (special tokens removed)."""
        tok = self._need_tokenizer()
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if not batch:
            return []
        ids = self.generate_ids([tok.encode(t) for t in batch], max_new_tokens)
        outs = [tok.decode(row, skip_special_tokens=True) for row in ids]
        return outs[0] if single else outs

    # --------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def logits(self, input_ids, decoder_input_ids, attention_mask=None) -> torch.Tensor:
        """Teacher-forced logits [batch, decoder_len, vocab] (float32)."""
        ids, mask = self._encoder_batch(input_ids, attention_mask)
        if isinstance(decoder_input_ids, (list, tuple)) and decoder_input_ids and \
                isinstance(decoder_input_ids[0], (list, tuple)) and len({len(r) for r in decoder_input_ids}) > 1:
            raise SlmError("decoder_input_ids rows must have equal length")
        dec = torch.as_tensor(decoder_input_ids, dtype=torch.long)
        if dec.dim() == 1:
            dec = dec[None]
        if dec.shape[0] != ids.shape[0] or dec.shape[1] == 0:
            raise SlmError(f"decoder_input_ids shape {tuple(dec.shape)} does not fit {ids.shape[0]} input row(s)")
        self._check_ids(dec, "decoder_input_ids")
        return self.model(ids, mask, dec.to(ids.device)).float()

    # ----------------------------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        """Write config.json, model.safetensors (HF names), generation_config.json and the tokenizer into
        ``folder`` atomically (built in a temporary sibling, then renamed into place)."""
        cfg = self.config
        state = t5_state_to_hf(self.model.state_dict(), cfg)
        hf_cfg = cfg.to_hf()
        hf_cfg["dtype"] = dtype_name(state["shared.weight"].dtype)
        gen = {"decoder_start_token_id": self.decoder_start_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id}

        def fill(tmp: Path) -> None:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)

        return write_folder_atomically(Path(folder), fill)

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def info(self) -> dict:
        """What ``slm info`` prints for an encoder–decoder model."""
        cfg = self.config
        groups: Counter = Counter()
        for name, kind in self.tensor_types.items():
            groups[(re.sub(r"\.block\.\d+\.", ".block.N.", name), kind)] += 1
        variant = f"{'gated ' if cfg.gated else ''}{cfg.activation} FFN, " + (
            "tied head" if cfg.tie_word_embeddings else "separate lm_head") + (
            " scaled by d_model^-0.5" if cfg.scale_decoder_outputs else "")
        return {
            "source": self.source,
            "family": "t5",
            "architecture": f"encoder-decoder ({variant})",
            "encoder_layers": cfg.num_layers,
            "decoder_layers": cfg.num_decoder_layers,
            "hidden_size": cfg.d_model,
            "heads": f"{cfg.num_heads}, head_dim {cfg.d_kv}",
            "intermediate_size": cfg.d_ff,
            "vocab_size": cfg.vocab_size,
            "relative_attention": f"{cfg.relative_attention_num_buckets} buckets, max distance "
                                  f"{cfg.relative_attention_max_distance}",
            "tied_embeddings": cfg.tie_word_embeddings,
            "parameters": cfg.num_parameters(),
            "compute_dtype": dtype_name(self.model.dtype),
            "quantization": "none",
            "tensor_types": {f"{g} [{k}]": n for (g, k), n in sorted(groups.items())},
            "tokenizer": describe_tokenizer(self.tokenizer) if self.tokenizer is not None else "none",
            "decoder_start_id": self.decoder_start_id,
            "eos_ids": sorted(self.eos_ids),
        }


def load_seq2seq(path: str | Path, dtype: str | torch.dtype = "float32") -> Seq2SeqLM:
    """Load a Hugging Face T5 / Flan-T5 folder (config.json with model_type t5 + safetensors or .bin)."""
    torch_dtype = resolve_dtype(dtype)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a model folder")
    hf_json = read_hf_json(folder)
    weights = read_hf_state_dict(folder, None)
    model = build_t5(hf_json, weights, torch_dtype, source=str(folder))
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    tokenizer = Tokenizer.from_hf_dir(folder) if has_tokenizer else None
    generation = read_optional_json(folder / "generation_config.json")
    return Seq2SeqLM(model, tokenizer, str(folder), tensor_dtypes(weights), generation)
