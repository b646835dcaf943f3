"""Task ``classify``: sequence classification with an encoder -- labelled text files (TSV / CSV with a
header, JSON Lines, a JSON list), ``<s> text </s>``, a fresh classification head (kept when the checkpoint
has one of the same size); ``eval.json`` gets the accuracy on the whole validation set."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import SlmError
from ...models.encoder import EncoderModel
from ..common import data_path
from ..corpus import val_mask
from ..encoder_tasks import (ClassificationLoss, ClassifyBatches, check_encoder_run, classification_metrics,
                             encoder_saver, encoder_to_train, labelled_examples)
from ..registry import register_task
from ..trainer import RunParts


def build(cfg, d) -> RunParts:
    check_encoder_run(cfg)
    files = [cfg.data.train_file] if isinstance(cfg.data.train_file, str) else list(cfg.data.train_file or [])
    if not files:
        raise SlmError("config: task classify needs data.train_file (a labelled .tsv/.csv/.jsonl/.json file "
                       "or a list of them)")
    model, vocab = encoder_to_train(cfg, d, ("classifier",))
    max_length = min(cfg.data.seq_len, model.cfg.max_tokens)
    train = labelled_examples([data_path(f) for f in files], cfg, vocab, max_length)
    if cfg.data.val_file:
        val = labelled_examples([data_path(cfg.data.val_file)], cfg, vocab, max_length)
    else:  # hold out a seeded fraction of the training examples
        held = val_mask(len(train), cfg.data.val_fraction, cfg.run.seed)
        train, val = [e for e, h in zip(train, held) if not h], [e for e, h in zip(train, held) if h]
    val_source = ClassifyBatches(val, cfg.run.seed, vocab.pad_id, shuffle=False)

    def write_eval(module: EncoderModel) -> None:
        result = {"val_file": cfg.data.val_file, **classification_metrics(module, val_source,
                                                                           cfg.run.micro_batch_size)}
        (Path(cfg.out_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")

    return RunParts(model, ClassifyBatches(train, cfg.run.seed, vocab.pad_id), val_source, len(val),
                    encoder_saver(cfg, model.cfg, ("classifier",), vocab, after=write_eval),
                    objective=ClassificationLoss(model), blocks=list(model.encoder.layers))


register_task("classify", build, summary="sequence classification with an encoder")
