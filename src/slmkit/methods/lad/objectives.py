"""LAD's two training objectives over a student encoder and a frozen teacher (both :class:`EncoderModel`).

Length configurations are sampled as the Length-Adaptive Transformer does: a drop bound p is drawn from
``drop_bounds``; layer i keeps a fraction drawn uniformly from ``[r_{i-1} (1 - p), r_{i-1}]`` (r_{-1} = 1) and
the last layer keeps what the one before it kept.

* :class:`GeneralDistillLoss` (stage 1, unlabeled text): ``L_full + w (L_align + L_recon)``, each term a
  token-level InfoNCE (student states through a linear map vs the teacher's, queue of teacher vectors) plus
  the MSE of attention scores: L_full for the un-pruned student against the teacher's second-to-last
  layer; L_align for the pruned student on the tokens it kept; L_recon for the pruned student's states with
  ``[MASK]`` embeddings (plus the detached dropped states) at the dropped positions, mapped to the teacher's
  width and run through the teacher's last layer, against the teacher's output. ``variant: plain`` keeps
  L_full only: ordinary distillation, the baseline.
* :class:`TaskDistillLoss` (stage 2, labelled text): the un-pruned student gets ``T^2 KL(teacher || student)
  + CE``; ``variant: lad`` adds sub-models per step (the smallest the bound allows, then random ones), each
  with the KL to the teacher and an InfoNCE between its projected [CLS] state and the teacher's, over a
  queue of teacher [CLS] vectors; the terms are averaged over the models run.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SlmError
from ...models.encoder import EncoderModel
from ...train.losses import token_kl
from .losses import FeatureQueue, gather_scores, info_nce, score_mse
from .pruning import pruned_forward, run_layer

VARIANTS = ("lad", "plain")


def sample_ratios(n_layers: int, bound: float, rng: random.Random) -> list[float]:
    """One length configuration under drop bound ``bound`` (the LAT rule; the last layer repeats the one before)."""
    ratios, r = [], 1.0
    for i in range(n_layers):
        if i < n_layers - 1 or n_layers == 1:
            r = rng.uniform(r * (1.0 - bound), r)
        ratios.append(max(r, 1e-3))
    return ratios


def smallest_ratios(n_layers: int, bound: float) -> list[float]:
    """Every layer shrinks by exactly ``bound`` (the sandwich rule's smallest model); the last repeats."""
    ratios = [(1.0 - bound) ** (i + 1) for i in range(max(1, n_layers - 1))]
    return [max(r, 1e-3) for r in (ratios + ratios[-1:])[:n_layers]]


def _pairs(mask: torch.Tensor) -> torch.Tensor:
    return mask[:, :, None] & mask[:, None, :]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise SlmError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


class GeneralDistillLoss(nn.Module):
    """Stage 1 (task-agnostic) distillation; ``forward(input_ids, attention_mask)`` -> (loss x rows, rows)."""

    def __init__(self, model: EncoderModel, teacher: EncoderModel, variant: str = "lad",
                 drop_bounds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), queue_size: int = 4096,
                 tau: float = 0.07, weight: float = 0.5, mask_id: int | None = None, seed: int = 0):
        super().__init__()
        _check_variant(variant)
        if model.cfg.n_heads != teacher.cfg.n_heads:
            raise SlmError(f"attention-score alignment needs the same head count: student {model.cfg.n_heads}, "
                           f"teacher {teacher.cfg.n_heads}")
        if teacher.cfg.n_layers < 2:
            raise SlmError("the teacher needs at least 2 layers (alignment uses its second-to-last)")
        if variant == "lad" and mask_id is None:
            raise SlmError("the reconstruction loss needs the tokenizer's mask token")
        ds, dt = model.cfg.hidden_size, teacher.cfg.hidden_size
        self.model, self.teacher, self.variant = model, teacher, variant
        self.drop_bounds, self.tau, self.weight, self.mask_id = list(drop_bounds), tau, weight, mask_id
        self.dense_last = nn.Linear(ds, dt)
        self.dense_recon = nn.Linear(ds, dt)
        self.queue = FeatureQueue(queue_size, dt)
        self.recon_queue = FeatureQueue(queue_size, dt)
        self.rng = random.Random(seed)

    def _term(self, s_states, t_states, s_scores, t_scores, mask, queue) -> torch.Tensor:
        nce = info_nce(s_states[mask], t_states[mask], queue.negatives(), self.tau) / mask.sum().clamp(min=1)
        return nce + score_mse(s_scores, t_scores, _pairs(mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None):
        mask = attention_mask.bool()
        with torch.no_grad():
            t = pruned_forward(self.teacher, input_ids, attention_mask, None, collect=True)
        t_states, t_scores = t.states[-2], t.scores[-2]
        full = pruned_forward(self.model, input_ids, attention_mask, None, collect=True)
        loss = self._term(self.dense_last(full.states[-1]), t_states, full.scores[-1], t_scores, mask, self.queue)
        if self.variant == "lad":
            ratios = sample_ratios(self.model.cfg.n_layers, self.rng.choice(self.drop_bounds), self.rng)
            pruned = pruned_forward(self.model, input_ids, attention_mask, ratios, collect=True, keep_dropped=True)
            # L_align: the kept tokens; scores of the last layer cover the tokens that entered it
            kept = pruned.mask
            t_kept = t_states.gather(1, pruned.index[:, :, None].expand(-1, -1, t_states.shape[-1]))
            entered, entered_mask = pruned.score_index[-1], pruned.score_mask[-1]
            align = info_nce(self.dense_last(pruned.hidden)[kept], t_kept[kept], self.queue.negatives(), self.tau)
            align = align / kept.sum().clamp(min=1) + score_mse(pruned.scores[-1], gather_scores(t_scores, entered),
                                                                _pairs(entered_mask))
            # L_recon: back to full length, through the teacher's last layer
            full_len = self._restore(pruned, input_ids)
            recon, recon_scores = run_layer(self.teacher.encoder.layers[-1], self.dense_recon(full_len), mask)
            recon_loss = self._term(recon, t.hidden, recon_scores, t.scores[-1], mask, self.recon_queue)
            loss = loss + self.weight * (align + recon_loss)
            if self.training:
                self.recon_queue.push(t.hidden[mask])
        if self.training:  # validation batches do not become negatives
            self.queue.push(t_states[mask])
        rows = torch.tensor(len(input_ids), device=input_ids.device)
        return loss * rows, rows

    def _restore(self, pruned, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, D]: the kept tokens' final states at their positions; at every dropped position the [MASK]
        embedding plus the (detached) state the token had when it was dropped."""
        b, t = input_ids.shape
        d = pruned.hidden.shape[-1]
        mask_vec = self.model.encoder.embeddings.word.weight[self.mask_id]
        full = pruned.hidden.new_zeros(b, t, d)
        for states, dropped, index in pruned.dropped:
            values = (states.detach() + mask_vec) * dropped[:, :, None]
            full = full.scatter_add(1, index[:, :, None].expand(-1, -1, d), values)
        kept = pruned.hidden * pruned.mask[:, :, None]
        return full.scatter_add(1, pruned.index[:, :, None].expand(-1, -1, d), kept)


class TaskDistillLoss(nn.Module):
    """Stage 2: distillation from a fine-tuned teacher; ``forward(input_ids, attention_mask, labels)``."""

    def __init__(self, model: EncoderModel, teacher: EncoderModel, variant: str = "lad",
                 drop_bounds: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), sub_models: int = 2,
                 temperature: float = 1.0, ce_weight: float = 1.0, queue_size: int = 4096, tau: float = 0.07,
                 seed: int = 0):
        super().__init__()
        _check_variant(variant)
        if model.classifier is None or teacher.classifier is None:
            raise SlmError("task distillation needs a classification head on the student and the teacher")
        if model.cfg.num_labels != teacher.cfg.num_labels:
            raise SlmError(f"the student has {model.cfg.num_labels} labels, the teacher {teacher.cfg.num_labels}")
        self.model, self.teacher, self.variant = model, teacher, variant
        self.drop_bounds, self.sub_models = list(drop_bounds), sub_models
        self.temperature, self.ce_weight, self.tau = temperature, ce_weight, tau
        self.dense_cls = nn.Linear(model.cfg.hidden_size, teacher.cfg.hidden_size)
        self.queue = FeatureQueue(queue_size, teacher.cfg.hidden_size)
        self.rng = random.Random(seed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        with torch.no_grad():
            t_hidden = self.teacher(input_ids, attention_mask)
            t_logits = self.teacher.classifier(t_hidden).float()
            t_cls = t_hidden[:, 0]
        logits = self.model.classify(input_ids, attention_mask).float()
        total = token_kl(logits, t_logits, self.temperature, reduction="mean") \
            + self.ce_weight * F.cross_entropy(logits, labels)
        runs = 1
        if self.variant == "lad":
            bound = self.rng.choice(self.drop_bounds)
            for k in range(self.sub_models):
                n = self.model.cfg.n_layers
                ratios = smallest_ratios(n, max(self.drop_bounds)) if k == 0 else sample_ratios(n, bound, self.rng)
                hidden = pruned_forward(self.model, input_ids, attention_mask, ratios).hidden
                sub_logits = self.model.classifier(hidden).float()
                total = total + token_kl(sub_logits, t_logits, self.temperature, reduction="mean")
                total = total + info_nce(self.dense_cls(hidden[:, 0]), t_cls, self.queue.negatives(), self.tau) / len(hidden)
                runs += 1
            if self.training:
                self.queue.push(t_cls)
        rows = torch.tensor(len(input_ids), device=input_ids.device)
        return total / runs * rows, rows


__all__ = ["VARIANTS", "sample_ratios", "smallest_ratios", "GeneralDistillLoss", "TaskDistillLoss"]
