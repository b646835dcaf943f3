"""LAD's distillation terms (Liu et al. 2023, after the released ``lad.py``): token- and sentence-level
contrastive alignment to the teacher with a MoCo-style memory queue, and attention-score MSE.

``info_nce``: for student vector s_i and its teacher vector t_i (both L2-normalised),
``-log( exp(s_i.t_i / tau) / (exp(s_i.t_i / tau) + sum_k exp(s_i.q_k / tau)) )`` where q_k are teacher vectors of
earlier batches (the queue), tau = 0.07. ``score_mse``: mean squared error between pre-softmax attention scores
over the (query, key) pairs both models see, averaged over heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SlmError


def info_nce(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor | None,
             temperature: float = 0.07) -> torch.Tensor:
    """Sum over the N rows of the InfoNCE loss; ``student`` / ``teacher`` [N, D], ``queue`` [K, D] negatives
    (None: none -- only the positive, the loss is then 0)."""
    if student.shape != teacher.shape:
        raise SlmError(f"info_nce: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    positive = (s * t).sum(-1, keepdim=True)
    logits = positive if queue is None or queue.numel() == 0 else torch.cat([positive, s @ queue.float().T], dim=1)
    logits = logits / temperature
    return F.cross_entropy(logits, torch.zeros(len(s), dtype=torch.long, device=s.device), reduction="sum")


class FeatureQueue(nn.Module):
    """A ring of the last ``size`` teacher vectors (L2-normalised, no gradient), the negatives of ``info_nce``.
    Starts empty; not saved with the model."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0:
            raise SlmError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.register_buffer("vectors", torch.zeros(size, dim), persistent=False)
        self.filled = 0
        self.pointer = 0

    def negatives(self) -> torch.Tensor:
        return self.vectors[:self.filled].clone()  # a copy: push() overwrites the ring in place

    @torch.no_grad()
    def push(self, vectors: torch.Tensor) -> None:
        if self.size == 0:
            return
        vectors = F.normalize(vectors.detach().float(), dim=-1)[-self.size:]
        n = len(vectors)
        end = self.pointer + n
        if end <= self.size:
            self.vectors[self.pointer:end] = vectors
        else:
            first = self.size - self.pointer
            self.vectors[self.pointer:] = vectors[:first]
            self.vectors[:n - first] = vectors[first:]
        self.pointer = end % self.size
        self.filled = min(self.size, self.filled + n)


def score_mse(student: torch.Tensor, teacher: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean over the valid (query, key) pairs and heads of ``(student - teacher)^2``; scores [B, H, Q, K],
    ``pairs`` bool [B, Q, K]."""
    if student.shape != teacher.shape:
        raise SlmError(f"score_mse: student scores {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                       f"differ (the layers need the same head count)")
    valid = pairs[:, None].expand_as(student)
    diff = torch.where(valid, student.float() - teacher.float(), student.new_zeros((), dtype=torch.float32))
    return diff.pow(2).sum() / valid.sum().clamp(min=1)


def gather_scores(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The [B, H, k, k] block of full-length scores [B, H, T, T] at the positions ``index`` [B, k]."""
    b, h, _, t = scores.shape
    rows = scores.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], t))
    return rows.gather(3, index[:, None, None, :].expand(b, h, index.shape[1], index.shape[1]))


__all__ = ["info_nce", "FeatureQueue", "score_mse", "gather_scores"]
