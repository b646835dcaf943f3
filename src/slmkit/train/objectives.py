"""Training objectives over slmkit's Decoder: the causal LM loss, and token-level distillation from a
frozen teacher.

An objective is a module holding the trained model (as ``.model``) and whatever else its loss needs (a
frozen teacher, a projection); ``forward(**batch)`` returns ``(loss_sum, n_targets)``. The masked-LM and
seq2seq objectives live with their model families (``train/encoder_tasks.py``, ``train/seq2seq_tasks.py``);
the loss formulas distillation methods share are in ``train/losses.py``.

Causal LM: predict token t+1 from tokens <= t; labels of -100 carry no loss (chat SFT puts loss on the
assistant's tokens only by labelling the rest -100). With packing, several documents share a window; with
``segments`` given, attention stops at document boundaries (a block-diagonal causal mask) and RoPE
positions restart at each document.
The loss module returns the *sum* of token losses and the token count, so the Trainer can normalise by the
number of target tokens in the whole global batch: the gradient is then the same for any split of that batch
into micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import IGNORE, token_kl


def document_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: query i may attend key j when j <= i and both lie in the same document."""
    t = segments.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return causal[None] & (segments[:, :, None] == segments[:, None, :])


class CausalLMLoss(nn.Module):
    """Holds the model so that DDP / FSDP wrap one module whose forward is the whole loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = document_attention_mask(segments) if segments is not None else None
        hidden = self.model.features(input_ids, positions=positions, attn_mask=mask).flatten(0, 1)
        labels = labels.flatten()
        keep = labels != IGNORE
        count = keep.sum()
        if count < labels.numel():  # the output head only where there is a loss (chat SFT, padding)
            hidden, labels = hidden[keep], labels[keep]
        logits = self.model.head(hidden)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), count


class PrefixLMLoss(nn.Module):
    """The causal LM loss of a prefix LM (UL2's S-denoiser, UL2R): each row's first ``prefix_len`` tokens attend
    to each other in both directions, the rest causally; labels of -100 (the prefix) carry no loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, prefix_len: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        from .denoisers import prefix_lm_mask

        mask = prefix_lm_mask(prefix_len, input_ids.shape[1])
        hidden = self.model.features(input_ids, attn_mask=mask).flatten(0, 1)
        labels = labels.flatten()
        keep = labels != IGNORE
        logits = self.model.head(hidden[keep])
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), keep.sum()


class DistillationLoss(nn.Module):
    """Token-level knowledge distillation (Hinton et al. 2015) for causal LMs:
    ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(labels)`` summed over the target
    positions, the teacher run without gradients. The teacher must share the student's vocabulary. Pass the
    teacher to the Trainer in ``RunParts.frozen``: it is then neither trained nor checkpointed."""

    def __init__(self, model: nn.Module, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}")
        self.model, self.teacher, self.temperature, self.alpha = model, teacher, temperature, alpha

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = document_attention_mask(segments) if segments is not None else None
        keep = labels.flatten() != IGNORE
        hidden = self.model.features(input_ids, positions=positions, attn_mask=mask).flatten(0, 1)[keep]
        student = self.model.head(hidden).float()
        with torch.no_grad():
            t_hidden = self.teacher.features(input_ids, positions=positions, attn_mask=mask).flatten(0, 1)[keep]
            teacher = self.teacher.head(t_hidden).float()
        loss = self.alpha * token_kl(student, teacher, self.temperature)
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(student, labels.flatten()[keep], reduction="sum")
        return loss, keep.sum()
