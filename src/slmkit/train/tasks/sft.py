"""Task ``sft``: chat fine-tuning of a trained decoder (full or LoRA) on an instruction or conversation
file, with the loss on the assistant's tokens only; conversations packed into rows of ``data.seq_len``."""

from __future__ import annotations

from ...errors import SlmError
from ..chat_data import build_chat_dataset
from ..common import data_path
from ..decoder_parts import ChatBatches, decoder_saver, load_model, with_lora
from ..registry import register_task
from ..trainer import RunParts


def build(cfg, d) -> RunParts:
    if cfg.model.init == "scratch":
        raise SlmError("config: chat fine-tuning (task sft) starts from a trained model; set model.init")
    if not cfg.data.chat:
        raise SlmError("config: task sft needs data.chat (an instruction or conversation file)")
    cfg.data.chat = data_path(cfg.data.chat)
    model, model_cfg, tokenizer = load_model(cfg)
    with_lora(model, cfg)
    train, val = build_chat_dataset(cfg.data.chat, tokenizer, cfg.data.seq_len, val_fraction=cfg.data.val_fraction,
                                    seed=cfg.run.seed, system=cfg.data.system)
    pad = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else model_cfg.eos_ids[0]
    sources = [ChatBatches(part, cfg.run.seed, pad, cfg.data.seq_len, cfg.data.pack) for part in (train, val)]
    return RunParts(model, *sources, len(val), decoder_saver(cfg, model_cfg, tokenizer))


register_task("sft", build, summary="chat fine-tuning, loss on the assistant's tokens")
