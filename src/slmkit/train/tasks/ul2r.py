"""Task ``ul2r``: continue a trained causal LM on UL2's mixture of denoisers as a prefix LM (U-PaLM's UL2R):
packed corpus windows turned into R / X / S examples (``train/denoisers.py``), the prefix attended in both
directions, the loss on the targets. The tokenizer must hold the mode tokens and ``<extra_id_i>`` sentinels
(``methods/ul2r.py`` adds them to a checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import SlmError
from ..common import data_path, prepare_shards
from ..corpus import PackedDataset
from ..decoder_parts import decoder_saver, load_model
from ..denoisers import MODE_TOKENS, MixtureBatches, max_spans, mixture
from ..objectives import PrefixLMLoss
from ..registry import register_task
from ..seq2seq_tasks import sentinel_ids
from ..trainer import RunParts


@dataclass
class UL2RSection:
    mixture: str = "upalm"  # upalm (50 % S, 25 % R, 25 % X) | ul2 (the seven denoisers, equal weights)
    weights: list[float] = field(default_factory=list)  # replace the mixture's weights, in its order


def special_ids(tokenizer, denoisers, window: int) -> tuple[np.ndarray, dict[str, int]]:
    """The sentinel ids a ``window``-token example may need and the mode tokens' ids; an error names the
    first token the tokenizer lacks."""
    modes = {}
    for mode in MODE_TOKENS.values():
        index = tokenizer.token_to_id(mode)
        if index is None:
            raise SlmError(f"ul2r: the tokenizer has no {mode} mode token; start from a checkpoint prepared by "
                           "`slm ul2r` (which adds the mode tokens and sentinels)")
        modes[mode] = index
    return sentinel_ids(tokenizer, max(1, max_spans(denoisers, window))), modes


def build(cfg, d) -> RunParts:
    if cfg.model.init == "scratch":
        raise SlmError("config: task ul2r continues a trained causal LM; set model.init")
    if not cfg.data.shards:
        cfg.data.corpus = [data_path(p) for p in cfg.data.corpus]
    denoisers = mixture(cfg.method.mixture, cfg.method.weights)
    model, model_cfg, tokenizer = load_model(cfg)
    sentinels, modes = special_ids(tokenizer, denoisers, cfg.data.seq_len + 1)
    shards = prepare_shards(cfg, tokenizer, d)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else model_cfg.eos_ids[0]
    pad = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else eos
    sources = [MixtureBatches(PackedDataset(shards, split, cfg.data.seq_len), cfg.run.seed, denoisers, sentinels,
                              modes, eos, pad, shuffle=split == "train") for split in ("train", "val")]
    width = sources[0].width - 1
    if width > model_cfg.max_position_embeddings:
        raise SlmError(f"ul2r: data.seq_len {cfg.data.seq_len} gives examples of {width} tokens, more than the "
                       f"model's {model_cfg.max_position_embeddings} positions; lower data.seq_len")
    val = PackedDataset(shards, "val", cfg.data.seq_len)
    return RunParts(model, *sources, len(val), decoder_saver(cfg, model_cfg, tokenizer), objective=PrefixLMLoss(model))


register_task("ul2r", build, section=UL2RSection, key="ul2r",
              summary="UL2R: a trained causal LM continued on UL2's mixture of denoisers as a prefix LM")
