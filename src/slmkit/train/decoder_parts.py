"""Parts the decoder tasks (``pretrain``, ``sft``, and the methods that train a decoder) share: batch
sources for packed windows and for chat data, a scratch model with its run tokenizer, loading a model to
fine-tune, and the saver that writes the result in Hugging Face layout (plus the PEFT adapter of a LoRA run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import SlmError
from ..formats.gguf_model import FLOAT_TYPES
from ..models.decoder import Decoder
from ..tokenizer import Tokenizer
from .common import on_main_then_all, scratch_vocab_size
from .config import TrainConfig
from .distributed import Dist


class PackedBatches:
    """Batches of packed windows: inputs = window[:-1], labels = window[1:]."""

    def __init__(self, dataset, seed: int, document_mask: bool, shuffle: bool = True):
        self.dataset, self.seed, self.document_mask, self.shuffle = dataset, seed, document_mask, shuffle

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        from .corpus import document_mask

        pick = (lambda k: self.dataset.sample(k, self.seed)) if self.shuffle else self.dataset.window
        windows = np.stack([pick(k) for k in indices]).astype(np.int64)
        batch = {"input_ids": torch.from_numpy(windows[:, :-1]), "labels": torch.from_numpy(windows[:, 1:].copy())}
        if self.document_mask:
            pos, seg = zip(*(document_mask(w[:-1], self.dataset.eos_id) for w in windows))
            batch["positions"] = torch.from_numpy(np.stack(pos)).long()
            batch["segments"] = torch.from_numpy(np.stack(seg)).long()
        return batch


class ChatBatches:
    """Batches of tokenized conversations (labels -100 outside assistant turns).

    With ``pack`` the conversations of a micro-batch are packed first-fit into rows of ``width`` tokens,
    each keeping its own RoPE positions and attending only to itself (a block-diagonal mask), so little
    compute goes to padding; otherwise rows are right-padded to a multiple of 64.
    """

    def __init__(self, dataset, seed: int, pad_id: int, width: int, pack: bool = True):
        self.dataset, self.seed, self.pad_id, self.width, self.pack = dataset, seed, pad_id, width, pack

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # labels are aligned with input_ids (HF style); the loss wants the label of the *next* token
        convs = [self.dataset.sample(k, self.seed) for k in indices]
        convs = [(c["input_ids"][:-1], c["labels"][1:]) for c in convs]
        tokens = torch.tensor(sum(len(ids) for ids, _ in convs))
        rows = self._rows(convs) if self.pack else [[c] for c in convs]
        width = self.width if self.pack else -(-max(len(ids) for ids, _ in convs) // 64) * 64
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for seg, (conv_ids, conv_labels) in enumerate(row):
                n = len(conv_ids)
                ids[r, at:at + n] = torch.tensor(conv_ids)
                labels[r, at:at + n] = torch.tensor(conv_labels)
                positions[r, at:at + n] = torch.arange(n)
                segments[r, at:at + n] = seg
                at += n
        batch = {"input_ids": ids, "labels": labels, "tokens": tokens}
        if self.pack:
            batch.update(positions=positions, segments=segments)
        return batch

    def _rows(self, convs):
        rows, used = [], []
        for conv in convs:
            n = len(conv[0])
            for r, u in enumerate(used):
                if u + n <= self.width:
                    rows[r].append(conv)
                    used[r] += n
                    break
            else:
                rows.append([conv])
                used.append(n)
        return rows


def init_weights(model: Decoder, std: float) -> None:
    """Normal(0, std) for every matrix and embedding, ones for norm scales, zeros for biases."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.zeros_(p) if model.cfg.norm_unit_offset else nn.init.ones_(p)


def scratch_tokenizer(cfg: TrainConfig, d: Dist) -> Tokenizer:
    from .bpe import train_bpe

    folder = Path(cfg.model.tokenizer or Path(cfg.out_dir) / "tokenizer")
    if cfg.model.tokenizer and not folder.is_dir():
        raise SlmError(f"model.tokenizer: {folder} is not a folder")
    on_main_then_all(d, lambda: train_bpe(cfg.data.corpus, folder, vocab_size=cfg.model.tokenizer_vocab_size,
                                           text_field=cfg.data.text_field),
                     lambda: (folder / "tokenizer.json").is_file())
    return Tokenizer.from_hf_dir(folder)


def scratch_model(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[Decoder, ModelConfig]:
    fields = dict(cfg.model.config)
    vocab = scratch_vocab_size(fields, tokenizer.vocab_size)
    special = tokenizer.special_tokens
    ids = {k: tokenizer.token_to_id(special[t]) if special.get(t) else None
           for k, t in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("pad_token_id", "pad_token"))}
    try:
        model_cfg = ModelConfig(vocab_size=vocab, **{**ids, **fields})
    except TypeError as exc:
        raise SlmError(f"model.config: {exc}") from None
    torch.manual_seed(cfg.run.seed)
    model = Decoder(model_cfg)
    init_weights(model, cfg.model.init_std)
    return model, model_cfg


def load_model(cfg: TrainConfig):
    from ..api import load

    try:
        lm = load(cfg.model.init, quant="none")  # training takes float weights, also from a quantized GGUF
    except SlmError as e:
        if "already a compact" in str(e):
            raise SlmError(f"{cfg.model.init}: a compact (quantized) checkpoint cannot be trained; use the float "
                           "one") from None
        raise
    stored = {kind for name, kind in lm.tensor_types.items() if name.startswith("blk.")} - set(FLOAT_TYPES)
    if stored:
        print(f"slmkit: training takes the float weights of {cfg.model.init} (stored as {', '.join(sorted(stored))}; "
              "dequantized)", file=sys.stderr)
    return lm.model.train(), lm.model.cfg, lm.tokenizer


def decoder_saver(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Tokenizer):
    from ..formats.hf import write_hf

    out = Path(cfg.out_dir)

    def save(trained):
        if isinstance(trained, dict):  # gathered from the ranks of a distributed run
            write_hf(out / "model", model_cfg, trained, tokenizer)
            return
        if cfg.lora is not None:
            from ..formats.peft import save_peft_adapter
            from ..nn.lora import merge_lora

            save_peft_adapter(trained, out / "adapter", family=model_cfg.family, r=cfg.lora.r,
                              alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets,
                              base_model_name_or_path=cfg.model.init)
            trained = merge_lora(trained)
        write_hf(out / "model", model_cfg, trained.state_dict(), tokenizer)
    return save


def with_lora(model: Decoder, cfg: TrainConfig) -> Decoder:
    """LoRA adapters on ``model`` when the config has a ``lora`` section (the base weights are then frozen)."""
    if cfg.lora is not None:
        from ..nn.lora import apply_lora

        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   targets=tuple(cfg.lora.targets))
    return model
