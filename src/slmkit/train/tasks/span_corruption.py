"""Task ``span_corruption``: T5 pretraining (Raffel et al. 2020, 3.1.4) -- about 15 % of each packed window
dropped in spans of mean length 3, the encoder reading the window with one sentinel per span and the decoder
writing each sentinel and the tokens it hid -- from scratch or from an HF T5 folder."""

from __future__ import annotations

from ...errors import SlmError
from ..common import data_path, prepare_shards
from ..corpus import PackedDataset
from ..registry import register_task
from ..seq2seq_tasks import (Seq2SeqLoss, SpanCorruptionBatches, check_t5_run, compute_input_and_target_lengths,
                             sentinel_ids, t5_blocks, t5_model, t5_saver)
from ..trainer import RunParts


def build(cfg, d) -> RunParts:
    check_t5_run(cfg)
    if not cfg.data.shards:
        if not cfg.data.corpus:
            raise SlmError("config: span_corruption needs data.corpus (text files) or data.shards")
        cfg.data.corpus = [data_path(p) for p in cfg.data.corpus]
    model, tokenizer = t5_model(cfg, d)
    sentinels = sentinel_ids(tokenizer)
    raw, _ = compute_input_and_target_lengths(cfg.data.seq_len, cfg.data.noise_density, cfg.data.mean_span_length)
    shards = prepare_shards(cfg, tokenizer, d)
    train, val = (PackedDataset(shards, split, raw) for split in ("train", "val"))
    sources = [SpanCorruptionBatches(part, cfg.run.seed, sentinels, tokenizer.eos_id, cfg.data.seq_len,
                                     cfg.data.noise_density, cfg.data.mean_span_length, shuffle=shuffle)
               for part, shuffle in ((train, True), (val, False))]
    return RunParts(model, *sources, len(val), t5_saver(cfg, model.cfg, tokenizer), objective=Seq2SeqLoss(model),
                    blocks=t5_blocks(model))


register_task("span_corruption", build, pretraining=True, summary="T5 span-corruption pretraining")
