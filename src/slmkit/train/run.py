"""``slm train`` (and ``slm pretrain`` / ``slm finetune``): a config in, a trained model out.

The config's ``task`` names a registered task (``slmkit.train.registry``: the built-in ones in
``slmkit.train.tasks``, the seed's methods in ``slmkit.methods``); its builder returns the ``RunParts``
(model, objective, batch sources, frozen teachers, evaluate hook, saver) and the one Trainer trains them.
The trained model is written to ``<out_dir>/model`` by the task's saver.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import memory
from .config import TrainConfig
from .distributed import init_distributed, shutdown
from .registry import get_task
from .trainer import Trainer, TrainResult


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    memory.enter_phase("training")  # keep freed memory: the same activations come back every step
    d = init_distributed(cfg.run.distributed, cfg.run.device)
    try:
        if cfg.run.threads:  # else torch's default: every core
            torch.set_num_threads(cfg.run.threads)
        parts = get_task(cfg.task).build(cfg, d)
        out = Path(cfg.out_dir)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        trainer = Trainer(parts.model, parts.train, cfg, d, parts.val, parts.val_size, on_save=parts.save,
                          objective=parts.objective, blocks=parts.blocks, frozen=parts.frozen,
                          evaluate=parts.evaluate)
        return trainer.fit(resume=resume)
    finally:
        shutdown(d)


def train_stage(raw: dict, label: str, method: str) -> Path:
    """One stage of a method's experiment: train the config ``raw`` (a dict as in a YAML file) with the one
    Trainer, continuing an interrupted run from its latest checkpoint; a finished stage (``out_dir/model``
    holds a config.json) is reused. Returns the model folder."""
    import sys

    from .checkpoint import latest_checkpoint
    from .config import config_from_dict

    out = Path(raw["out_dir"])
    if (out / "model" / "config.json").is_file():
        print(f"{method}: {label}: reusing {out / 'model'}", file=sys.stderr)
        return out / "model"
    print(f"{method}: {label}: training into {out}", file=sys.stderr)
    resume = latest_checkpoint(out / "checkpoints") is not None
    train(config_from_dict(raw), resume=resume)
    return out / "model"
