"""Task ``pretrain``: causal LM on packed corpus shards, from scratch (a BPE trained on the corpus, normal
init) or from a trained model (full or LoRA)."""

from __future__ import annotations

from ..common import data_path, prepare_shards
from ..corpus import PackedDataset
from ..decoder_parts import (PackedBatches, decoder_saver, load_model, scratch_model, scratch_tokenizer,
                             with_lora)
from ..registry import register_task
from ..trainer import RunParts


def build(cfg, d) -> RunParts:
    if not cfg.data.shards:
        cfg.data.corpus = [data_path(p) for p in cfg.data.corpus]
    if cfg.model.init == "scratch":
        tokenizer = scratch_tokenizer(cfg, d)
        model, model_cfg = scratch_model(cfg, tokenizer)
    else:
        model, model_cfg, tokenizer = load_model(cfg)
    with_lora(model, cfg)
    shards = prepare_shards(cfg, tokenizer, d)
    train = PackedDataset(shards, "train", cfg.data.seq_len)
    val = PackedDataset(shards, "val", cfg.data.seq_len)
    return RunParts(model, PackedBatches(train, cfg.run.seed, cfg.data.document_mask),
                    PackedBatches(val, cfg.run.seed, cfg.data.document_mask, shuffle=False), len(val),
                    decoder_saver(cfg, model_cfg, tokenizer))


register_task("pretrain", build, pretraining=True, summary="causal LM on packed corpus shards")
