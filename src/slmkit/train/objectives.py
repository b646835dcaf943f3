"""Training objectives over slmkit's Decoder.

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

IGNORE = -100


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
