"""The one training loop every method feeds: AdamW, a step-function LR schedule, gradient accumulation,
clipping, bf16 autocast, activation checkpointing, exact resume, and DDP / FSDP under torchrun.

A task hands the Trainer its ``RunParts``: the model, an objective (a module holding the model whose
``forward(**batch)`` returns ``(sum of losses, number of targets)``), batch sources, frozen modules
(teachers: run, never trained, wrapped or checkpointed), an ``evaluate`` hook and the save function.
A data source only has to turn a list of global sample indices into a batch (``batch(indices)``); the
Trainer decides which indices each rank and micro-batch takes: optimizer step ``s`` consumes samples
``s*G .. s*G+G-1`` of the global batch ``G = micro_batch_size * grad_accum * world``. The data position is
therefore just the step, and the loss is normalised by the target tokens of the whole global batch, so one
process with ``grad_accum=2`` and two processes with ``grad_accum=1`` compute the same update.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import SlmError
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import Dist, set_grad_sync, wrap
from .objectives import CausalLMLoss
from .precision import resolve_precision
from .schedule import lr_at


class BatchSource(Protocol):
    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]: ...


class Objective(Protocol):
    """A module holding the trained model (and any frozen teacher); ``forward(**batch)`` returns the *sum*
    of the batch's losses and the number of targets they are over, so the Trainer can normalise by the
    global batch's targets."""

    def __call__(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class RunParts:
    """What a task hands the Trainer.

    ``model``: the module trained and saved; ``train`` / ``val``: batch sources (``val_size`` samples in
    ``val``); ``save(model_or_state_dict)``: writes the result (a state dict of ``model`` when gathered from
    several ranks); ``objective``: default the causal LM loss; ``blocks``: what FSDP shards and torch.compile
    compiles one by one (default ``model.layers``); ``frozen``: modules inside the objective that are run but
    not trained (teachers) -- kept in eval mode, left out of DDP / FSDP and out of every checkpoint;
    ``evaluate(model) -> {name: value}``: task metrics, run with the validation loss and at the end, written
    to ``out_dir/evaluations.jsonl``.
    """

    model: nn.Module
    train: BatchSource
    val: BatchSource | None
    val_size: int
    save: Callable
    objective: nn.Module | None = None
    blocks: list[nn.Module] | None = None
    frozen: list[nn.Module] = field(default_factory=list)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    val_loss: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def total_steps(cfg: TrainConfig, world: int) -> int:
    if cfg.run.max_steps:
        return cfg.run.max_steps
    per_step = cfg.run.micro_batch_size * cfg.run.grad_accum * world * cfg.data.seq_len
    return max(1, math.ceil(cfg.run.max_tokens / per_step))


def _prefix_of(objective: nn.Module, module: nn.Module) -> str:
    """The state-dict prefix of ``module`` inside ``objective`` ("model." for the usual loss modules)."""
    for name, candidate in objective.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise SlmError(f"the objective {type(objective).__name__} does not hold the module "
                   f"{type(module).__name__} it is meant to train or run")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only (not on norms or biases), as TinyLlama and HF do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Trainer:
    def __init__(self, model: nn.Module, train_data: BatchSource, cfg: TrainConfig, d: Dist,
                 val_data: BatchSource | None = None, val_size: int = 0,
                 on_save: Callable[[nn.Module], None] | None = None, objective: nn.Module | None = None,
                 blocks: list[nn.Module] | None = None, frozen: list[nn.Module] | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None):
        """``objective``: a module holding ``model`` whose ``forward(**batch)`` returns (sum of token losses,
        number of target tokens); default: the causal LM loss. ``blocks``: the modules FSDP shards and
        torch.compile compiles one by one (default: ``model.layers``). ``frozen``: modules of the objective
        that are not trained (teachers). ``evaluate``: task metrics of the model (see ``RunParts``)."""
        self.cfg, self.d = cfg, d
        self.out = Path(cfg.out_dir)
        self.model = model
        self.train_data, self.val_data, self.val_size = train_data, val_data, val_size
        self.on_save = on_save
        self.steps = total_steps(cfg, d.world)
        self.global_batch = cfg.run.micro_batch_size * cfg.run.grad_accum * d.world
        self.frozen = any(not p.requires_grad for p in model.parameters())  # LoRA: checkpoint trainable only
        self.frozen_modules = list(frozen or [])
        for module in self.frozen_modules:
            module.requires_grad_(False)
        self.evaluate_fn = evaluate

        blocks = list(model.layers) if blocks is None else blocks
        if cfg.run.activation_checkpointing:
            model.gradient_checkpointing = True
        if cfg.run.compile:
            for block in blocks:
                block.compile()
        self.device = d.device
        self.precision = resolve_precision(cfg.run.precision, self.device, warn=d.main)
        model.to(self.device)
        objective = objective if objective is not None else CausalLMLoss(model)
        objective.to(self.device)
        self.student_prefix = _prefix_of(objective, model)
        self.skipped_prefixes = tuple(_prefix_of(objective, m) for m in self.frozen_modules)
        self.loss_module = wrap(objective, blocks, d, self.frozen_modules)
        groups = _param_groups(self.loss_module, cfg.optim.weight_decay)
        fused = d.mode != "fsdp"  # fused AdamW does not take sharded (DTensor) parameters
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                           fused=fused)
        self.trainable = [p for g in groups for p in g["params"]]

    # ------------------------------------------------------------------ state
    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.d.world > 1,
                                   ignore_frozen_params=self.frozen)
        model_sd, optim_sd = get_state_dict(self.loss_module, self.optimizer, options=options)
        return self._without_frozen(model_sd), optim_sd

    def _without_frozen(self, state: dict) -> dict:
        """A state dict of the objective less the frozen modules' entries (teachers are not checkpointed)."""
        if not self.skipped_prefixes:
            return state
        return {k: v for k, v in state.items() if not k.startswith(self.skipped_prefixes)}

    def _load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True, strict=not (self.frozen or self.frozen_modules))
        set_state_dict(self.loss_module, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=options)

    def save(self, step: int, tokens: int) -> None:
        model_sd, optim_sd = self._state_dicts()  # a collective under FSDP: every rank takes part
        if self.d.main:
            state = {"step": step, "model": model_sd, "optimizer": optim_sd, "rng": rng_state(),
                     "data_position": step * self.global_batch, "tokens": tokens, "world": self.d.world,
                     "config": self.cfg.to_dict()}
            save_checkpoint(self.out / "checkpoints", step, state, keep=self.cfg.run.keep_checkpoints)
        self.d.barrier()

    def _resume(self) -> tuple[int, int]:
        """(step, tokens seen) of the latest checkpoint, its state loaded; (0, 0) when there is none."""
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            if self.d.main:
                print(f"no checkpoint in {self.out / 'checkpoints'}: starting from step 0", file=sys.stderr)
            return 0, 0
        state = load_checkpoint(path)
        saved = state["data_position"] // max(1, state["step"]) if state["step"] else self.global_batch
        if saved != self.global_batch:
            raise SlmError(f"{path}: saved with a global batch of {saved} samples, this run has "
                           f"{self.global_batch}; resume with the same batch settings")
        self._load_state_dicts(state["model"], state["optimizer"])
        set_rng_state(state["rng"])
        return int(state["step"]), int(state["tokens"])

    # ------------------------------------------------------------------ steps
    def _indices(self, step: int, micro: int) -> list[int]:
        mb = self.cfg.run.micro_batch_size
        first = step * self.global_batch + (micro * self.d.world + self.d.rank) * mb
        return list(range(first, first + mb))

    def _autocast(self):
        """bf16 autocast when asked; in bf16 with torch.compile, attention through the plain math kernel,
        which inductor fuses and which trains faster here than the CPU flash kernel (2,070 -> 2,350 tok/s on
        the 10M config); in fp32 the flash kernel stays faster."""
        stack = contextlib.ExitStack()
        bf16 = self.precision == "bf16"
        if bf16:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if bf16 and self.cfg.run.compile and self.device.type == "cpu":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def train_step(self, step: int) -> tuple[float, float, int]:
        """One optimizer step; returns (mean loss over the global batch, grad norm, target tokens)."""
        cfg = self.cfg
        lr = lr_at(step, self.steps, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_steps=cfg.optim.warmup_steps,
                   schedule=cfg.optim.schedule, decay_fraction=cfg.optim.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.run.seed * 1_000_003 + step * 7919 + self.d.rank)  # dropout: a function of the step
        batches = [self.train_data.batch(self._indices(step, j)) for j in range(cfg.run.grad_accum)]
        tokens = sum(int(b.pop("tokens", b["input_ids"].numel())) for b in batches)  # real ones, not padding
        self.step_tokens = int(self.d.all_sum(torch.tensor(float(tokens), device=self.device)))
        count = self.d.all_sum(torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in batches)),
                                            device=self.device))
        if count.item() == 0:
            raise SlmError(f"step {step}: the global batch has no target tokens (every label is -100)")
        loss_sum = torch.zeros((), device=self.device)
        for j, batch in enumerate(batches):
            set_grad_sync(self.loss_module, self.d, j == len(batches) - 1)
            with self._autocast():
                loss, _ = self.loss_module(**self._on_device(batch))
            (loss * (self.d.world / count)).backward()  # DDP / FSDP average over ranks: undo that
            loss_sum += loss.detach().float()
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = self.d.all_sum(loss_sum)
        return float(total / count), grad_norm, int(count)

    def _clip(self) -> float:
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _inputs(self, batch: dict) -> dict:
        batch.pop("tokens", None)
        return self._on_device(batch)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_data is None or self.val_size == 0:
            return None
        mb = self.cfg.run.micro_batch_size
        n = min(self.val_size, self.cfg.run.eval_batches * mb)
        stride = self.val_size / n  # evenly spread over the validation set, the same every time
        picks = [int(i * stride) for i in range(n)]
        loss_sum, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.loss_module.eval()
        for start in range(self.d.rank * mb, n, mb * self.d.world):
            with self._autocast():
                loss, c = self.loss_module(**self._inputs(self.val_data.batch(picks[start:start + mb])))
            loss_sum += loss.float()
            count += c
        if self.d.mode == "fsdp":  # every rank must run the same number of forwards (all-gathers)
            rounds = math.ceil(n / (mb * self.d.world))
            done = len(range(self.d.rank * mb, n, mb * self.d.world))
            for _ in range(rounds - done):
                with self._autocast():
                    self.loss_module(**self._inputs(self.val_data.batch(picks[:1])))
        self._train_mode()
        loss_sum, count = self.d.all_sum(loss_sum), self.d.all_sum(count)
        return float(loss_sum / count) if count > 0 else None

    def _final_save(self) -> None:
        """Hand the trained model to ``on_save``: the module itself in one process, else the full state
        dict gathered from every rank (on the main rank only)."""
        if self.d.world == 1:
            self.on_save(self.model)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.d.main:
            prefix = self.student_prefix
            self.on_save({k[len(prefix):]: v for k, v in self._without_frozen(state).items() if k.startswith(prefix)})
        self.d.barrier()

    def _keep_evaluations_up_to(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their rows from ``evaluations.jsonl`` (all
        of them when starting from step 0), rewritten atomically, as metrics.csv is."""
        path = self.out / "evaluations.jsonl"
        if self.evaluate_fn is None or not self.d.main or not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def _train_mode(self) -> None:
        self.loss_module.train()
        for module in self.frozen_modules:  # a teacher's dropout stays off
            module.eval()

    def run_evaluate_hook(self, step: int) -> dict[str, float] | None:
        """The task's own metrics of the model (main rank), appended to ``out_dir/evaluations.jsonl``."""
        if self.evaluate_fn is None or not self.d.main:
            return None
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluate_fn(self.model).items()}
        self.model.train(was_training)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "evaluations.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        return metrics

    # ------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> TrainResult:
        from tqdm import tqdm

        from .metrics import MetricsLogger
        from .plot import plot_losses

        cfg = self.cfg
        if not resume and latest_checkpoint(self.out / "checkpoints") is not None:
            raise SlmError(f"{self.out} already holds checkpoints of a run: pass --resume to continue it, or "
                           f"choose another out_dir")
        start, tokens_seen = self._resume() if resume else (0, 0)
        # A fresh run starts a new metrics.csv even over the rows of one killed before its first checkpoint.
        logger = MetricsLogger(self.out, resume_step=start if resume else None) if self.d.main else None
        self._keep_evaluations_up_to(start)
        self._train_mode()
        bar = tqdm(total=self.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (cfg.run.progress and self.d.main))
        history, loss, val = [], float("nan"), None
        if start == 0 and self.val_data is not None and self.val_size:  # the starting point, for comparison
            val = self.evaluate()
            if logger is not None:
                logger.log(0, tokens=0, val_loss=val)
            history.append({"step": 0, "tokens": 0, "val_loss": val})
        t_start = time.perf_counter()
        train_seconds, tokens_since = 0.0, 0  # tokens/s counts training steps only, not evaluation or saving
        for step in range(start, self.steps):
            t_step = time.perf_counter()
            loss, grad_norm, _ = self.train_step(step)
            train_seconds += time.perf_counter() - t_step
            done = step + 1
            tokens_since += self.step_tokens
            tokens_seen += self.step_tokens
            metrics = None
            row: dict[str, Any] = {"tokens": tokens_seen, "loss": loss,
                                   "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
            if done % cfg.run.eval_every == 0 or done == self.steps:
                val = self.evaluate()
                row["val_loss"] = val
                metrics = self.run_evaluate_hook(done)
            if done % cfg.run.log_every == 0 or "val_loss" in row:
                row["tokens_per_s"] = tokens_since / max(train_seconds, 1e-9)  # elapsed_s: the logger's clock,
                train_seconds, tokens_since = 0.0, 0                              # continued across resumes
                if logger is not None:
                    logger.log(done, **row)
                history.append({"step": done, **row, **(metrics or {})})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}",
                            **({"val": f"{val:.4f}"} if val is not None else {}))
            bar.update(1)
            if done % cfg.run.save_every == 0 or done == self.steps:
                self.save(done, tokens_seen)
        bar.close()
        seconds = time.perf_counter() - t_start
        if logger is not None:
            logger.close()
            plot_losses(self.out / "metrics.csv", self.out / "loss.png", title=self.out.name)
        if self.on_save is not None:
            self._final_save()
        return TrainResult(self.steps, tokens_seen, loss, val, seconds, history)
