"""Task ``mlm``: RoBERTa masked-LM pretraining (Liu et al. 2019) -- packed FULL-SENTENCES rows wrapped
``<s> ... </s>``, dynamic masking (15 % of the non-special tokens, 80/10/10), no next-sentence prediction --
from scratch (a BPE with RoBERTa's special tokens trained on the corpus) or from an encoder checkpoint."""

from __future__ import annotations

from ...errors import SlmError
from ..common import data_path, prepare_shards
from ..corpus import PackedDataset
from ..encoder_tasks import (MaskedLMLoss, MLMBatches, check_encoder_run, check_fits, encoder_saver,
                             encoder_to_train, special_token_ids)
from ..registry import register_task
from ..trainer import RunParts


def build(cfg, d) -> RunParts:
    check_encoder_run(cfg)
    if not cfg.data.shards:
        cfg.data.corpus = [data_path(p) for p in cfg.data.corpus]
    if cfg.data.seq_len < 3:
        raise SlmError("config: data.seq_len must be at least 3 for masked-LM rows (<s> text </s>)")
    model, vocab = encoder_to_train(cfg, d, ("mlm",))
    if vocab.mask_id is None:
        raise SlmError("the tokenizer has no mask token (mask_token in tokenizer_config.json); masked-LM "
                       "training needs one")
    check_fits(model, cfg.data.seq_len)
    shards = prepare_shards(cfg, vocab.tokenizer, d)
    body = cfg.data.seq_len - 2
    train, val = PackedDataset(shards, "train", body), PackedDataset(shards, "val", body)
    common = dict(cls_id=vocab.cls_id, sep_id=vocab.sep_id, mask_id=vocab.mask_id,
                  vocab_size=vocab.tokenizer.vocab_size, special_ids=special_token_ids(vocab.tokenizer),
                  mask_prob=cfg.data.mask_prob)
    return RunParts(model, MLMBatches(train, cfg.run.seed, **common),
                    MLMBatches(val, cfg.run.seed, shuffle=False, **common), len(val),
                    encoder_saver(cfg, model.cfg, ("mlm",), vocab), objective=MaskedLMLoss(model),
                    blocks=list(model.encoder.layers))


register_task("mlm", build, pretraining=True, summary="RoBERTa masked-LM pretraining")
