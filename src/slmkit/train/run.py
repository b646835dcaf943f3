"""``slm pretrain`` and ``slm finetune``: a config in, a trained model out.

Pretraining from scratch: train a byte-level BPE on the corpus (unless a tokenizer is given), tokenize the
corpus into packed shards (cached under the run folder), build the model from ``model.config`` with normal
init, and train. Fine-tuning: load a model (registry name, GGUF or HF folder), full or LoRA, on packed
corpus shards (task ``pretrain``) or chat data with loss on the assistant's tokens (task ``sft``).
The trained model is written in HF layout to ``<out_dir>/model``; LoRA runs also write the adapter alone
in PEFT's layout to ``<out_dir>/adapter``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import memory
from ..config import ModelConfig
from ..errors import SlmError
from ..formats.gguf_model import FLOAT_TYPES
from ..models.decoder import Decoder
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .distributed import Dist, init_distributed, shutdown
from .trainer import Trainer, TrainResult


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


def data_path(path: str) -> str:
    """A data path from a config: absolute as given, relative ones against ``$SLMKIT_DATA`` (else the
    current folder), as evaluation tasks resolve theirs."""
    import os

    p = Path(path).expanduser()
    if not p.is_absolute() and os.environ.get("SLMKIT_DATA"):
        p = Path(os.environ["SLMKIT_DATA"]).expanduser() / p
    if not p.exists():
        hint = "" if p.is_absolute() and Path(path).is_absolute() else " (relative data paths resolve against $SLMKIT_DATA)"
        raise SlmError(f"data path {p} does not exist{hint}")
    return str(p)


def init_weights(model: Decoder, std: float) -> None:
    """Normal(0, std) for every matrix and embedding, ones for norm scales, zeros for biases."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.zeros_(p) if model.cfg.norm_unit_offset else nn.init.ones_(p)


def _on_main_then_all(d: Dist, make, ready) -> None:
    """Run ``make()`` on the main rank if ``ready()`` is false; the other ranks wait for it."""
    if d.main and not ready():
        make()
    d.barrier()


def _scratch_tokenizer(cfg: TrainConfig, d: Dist) -> Tokenizer:
    from .bpe import train_bpe

    folder = Path(cfg.model.tokenizer or Path(cfg.out_dir) / "tokenizer")
    if cfg.model.tokenizer and not folder.is_dir():
        raise SlmError(f"model.tokenizer: {folder} is not a folder")
    _on_main_then_all(d, lambda: train_bpe(cfg.data.corpus, folder, vocab_size=cfg.model.tokenizer_vocab_size,
                                           text_field=cfg.data.text_field),
                      lambda: (folder / "tokenizer.json").is_file())
    return Tokenizer.from_hf_dir(folder)


def _shards(cfg: TrainConfig, tokenizer: Tokenizer, d: Dist) -> Path:
    from .corpus import prepare_corpus

    folder = Path(cfg.data.shards or Path(cfg.out_dir) / "data")
    if not cfg.data.shards and not cfg.data.corpus:
        raise SlmError("config: pretraining needs data.corpus (text files) or data.shards (prepared tokens)")
    _on_main_then_all(d, lambda: prepare_corpus(cfg.data.corpus, tokenizer, folder, workers=cfg.data.workers,
                                                val_fraction=cfg.data.val_fraction, seed=cfg.run.seed,
                                                text_field=cfg.data.text_field, progress=cfg.run.progress),
                      lambda: (folder / "meta.json").is_file())
    meta = json.loads((folder / "meta.json").read_text())
    if meta["vocab_size"] > tokenizer.vocab_size:
        raise SlmError(f"{folder}: shards were made with a {meta['vocab_size']}-token vocabulary, the model's "
                       f"tokenizer has {tokenizer.vocab_size}")
    return folder


def _scratch_model(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[Decoder, ModelConfig]:
    fields = dict(cfg.model.config)
    vocab = fields.pop("vocab_size", None) or 64 * math.ceil(tokenizer.vocab_size / 64)
    if vocab < tokenizer.vocab_size:
        raise SlmError(f"model.config.vocab_size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
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


def _load_model(cfg: TrainConfig):
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


def _save_model(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Tokenizer):
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


@dataclass
class RunParts:
    """What a task hands the Trainer: the model, its objective (None: causal LM), the blocks FSDP shards
    (None: ``model.layers``), train / validation batch sources, and the function that saves the result."""

    model: nn.Module
    train: object
    val: object | None
    val_size: int
    save: Callable
    objective: nn.Module | None = None
    blocks: list[nn.Module] | None = None


def build(cfg: TrainConfig, d: Dist) -> RunParts:
    """Decoder tasks: causal LM on packed shards (``pretrain``) and chat SFT (``sft``)."""
    from .corpus import PackedDataset

    if not cfg.data.shards:
        cfg.data.corpus = [data_path(p) for p in cfg.data.corpus]
    if cfg.data.chat:
        cfg.data.chat = data_path(cfg.data.chat)

    if cfg.model.init == "scratch":
        if cfg.task != "pretrain":
            raise SlmError("config: chat fine-tuning (task sft) starts from a trained model; set model.init")
        tokenizer = _scratch_tokenizer(cfg, d)
        model, model_cfg = _scratch_model(cfg, tokenizer)
    else:
        model, model_cfg, tokenizer = _load_model(cfg)
    if cfg.lora is not None:
        from ..nn.lora import apply_lora

        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=tuple(cfg.lora.targets))
    if cfg.task == "pretrain":
        shards = _shards(cfg, tokenizer, d)
        train = PackedDataset(shards, "train", cfg.data.seq_len)
        val = PackedDataset(shards, "val", cfg.data.seq_len)
        return RunParts(model, PackedBatches(train, cfg.run.seed, cfg.data.document_mask),
                        PackedBatches(val, cfg.run.seed, cfg.data.document_mask, shuffle=False), len(val),
                        _save_model(cfg, model_cfg, tokenizer))
    from .chat_data import build_chat_dataset

    if not cfg.data.chat:
        raise SlmError("config: task sft needs data.chat (an instruction or conversation file)")
    train, val = build_chat_dataset(cfg.data.chat, tokenizer, cfg.data.seq_len, val_fraction=cfg.data.val_fraction,
                                    seed=cfg.run.seed, system=cfg.data.system)
    pad = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else model_cfg.eos_ids[0]
    sources = [ChatBatches(part, cfg.run.seed, pad, cfg.data.seq_len, cfg.data.pack) for part in (train, val)]
    return RunParts(model, *sources, len(val), _save_model(cfg, model_cfg, tokenizer))


def builder(task: str) -> Callable[[TrainConfig, Dist], RunParts]:
    """The function that builds a task's parts (decoder tasks here; encoder and seq2seq tasks in their modules)."""
    if task in ("pretrain", "sft"):
        return build
    if task in ("span_corruption", "seq2seq"):
        from .seq2seq_tasks import build_seq2seq_task

        return build_seq2seq_task
    if task in ("mlm", "classify"):
        from .encoder_tasks import build_encoder_task

        return build_encoder_task
    raise SlmError(f"task {task!r} has no builder")


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    memory.enter_phase("training")  # keep freed memory: the same activations come back every step
    d = init_distributed(cfg.run.distributed, cfg.run.device)
    try:
        if cfg.run.threads:  # else torch's default: every core
            torch.set_num_threads(cfg.run.threads)
        parts = builder(cfg.task)(cfg, d)
        out = Path(cfg.out_dir)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        trainer = Trainer(parts.model, parts.train, cfg, d, parts.val, parts.val_size, on_save=parts.save,
                          objective=parts.objective, blocks=parts.blocks)
        return trainer.fit(resume=resume)
    finally:
        shutdown(d)
