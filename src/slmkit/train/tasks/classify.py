"""Task ``classify``: sequence classification with an encoder -- labelled text files (TSV / CSV with a
header, JSON Lines, a JSON list), ``<s> text </s>``, a fresh classification head (kept when the checkpoint
has one of the same size); ``eval.json`` gets the accuracy on the whole validation set."""

from __future__ import annotations

import json
from pathlib import Path

from ...models.encoder import EncoderModel
from ..encoder_tasks import (ClassificationLoss, check_encoder_run, classification_metrics, classification_sources,
                             encoder_saver, encoder_to_train)
from ..registry import register_task
from ..trainer import RunParts


def build(cfg, d) -> RunParts:
    check_encoder_run(cfg)
    model, vocab = encoder_to_train(cfg, d, ("classifier",))
    train_source, val_source, n_val = classification_sources(cfg, vocab, min(cfg.data.seq_len, model.cfg.max_tokens))

    def write_eval(module: EncoderModel) -> None:
        result = {"val_file": cfg.data.val_file, **classification_metrics(module, val_source,
                                                                           cfg.run.micro_batch_size)}
        (Path(cfg.out_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")

    return RunParts(model, train_source, val_source, n_val,
                    encoder_saver(cfg, model.cfg, ("classifier",), vocab, after=write_eval),
                    objective=ClassificationLoss(model), blocks=list(model.encoder.layers))


register_task("classify", build, summary="sequence classification with an encoder")
