"""Task ``seq2seq``: fine-tuning a trained T5 on input/target records (a .jsonl file, or a JSON list), inputs
and targets each ended by EOS and cut to ``data.seq_len`` / ``data.target_len`` tokens, teacher-forced
cross-entropy on the target tokens."""

from __future__ import annotations

import sys

from ...errors import SlmError
from ..common import data_path
from ..corpus import val_mask
from ..registry import register_task
from ..seq2seq_tasks import (Seq2SeqBatches, Seq2SeqExamples, Seq2SeqLoss, check_t5_run, load_pairs, t5_blocks,
                             t5_model, t5_saver)
from ..trainer import RunParts


def build(cfg, d) -> RunParts:
    check_t5_run(cfg)
    model, tokenizer = t5_model(cfg, d)
    save, blocks = t5_saver(cfg, model.cfg, tokenizer), t5_blocks(model)
    if not cfg.data.train_file or not isinstance(cfg.data.train_file, str):
        raise SlmError("config: task seq2seq needs data.train_file: one .jsonl file of input/target records")
    limits = dict(input_field=cfg.data.input_field, target_field=cfg.data.target_field,
                  max_input=cfg.data.seq_len, max_target=cfg.data.target_len)
    pairs, cut = load_pairs(data_path(cfg.data.train_file), tokenizer, **limits)
    if cfg.data.val_file:
        val_pairs, val_cut = load_pairs(data_path(cfg.data.val_file), tokenizer, **limits)
        cut += val_cut
    else:
        to_val = val_mask(len(pairs), cfg.data.val_fraction, cfg.run.seed)
        pairs, val_pairs = [p for p, v in zip(pairs, to_val) if not v], [p for p, v in zip(pairs, to_val) if v]
    if cut and d.main:
        print(f"seq2seq: {cut} example(s) cut to data.seq_len={cfg.data.seq_len} input / "
              f"data.target_len={cfg.data.target_len} target tokens", file=sys.stderr)
    pad = model.cfg.pad_token_id
    train, val = Seq2SeqExamples(pairs), Seq2SeqExamples(val_pairs)
    return RunParts(model, Seq2SeqBatches(train, cfg.run.seed, pad), Seq2SeqBatches(val, cfg.run.seed, pad, False),
                    len(val), save, objective=Seq2SeqLoss(model), blocks=blocks)


register_task("seq2seq", build, summary="T5 fine-tuning on input/target records")
