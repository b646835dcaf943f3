"""Length-adaptive inference for BERT / RoBERTa encoders: attention-significance token pruning.

PoWER-BERT / the Length-Adaptive Transformer (Kim & Cho 2021): in layer ``i`` the significance of token j is
the attention it receives, summed over heads and (real) queries; after the attention the layer keeps its top
``keep_i`` tokens ([CLS] always) and only those go on through the layer's feed-forward block and every later
layer. A *length configuration* gives, per layer, the fraction of each row's real tokens kept; counts are
``max(1, ceil(ratio * n_real))`` and never grow from one layer to the next. Dropped tokens really leave the
computation: the tensors shrink, so the saving is measured, not simulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...errors import SlmError
from ...models.encoder import EncoderConfig, EncoderLayer, EncoderModel


@dataclass
class PrunedOutput:
    hidden: torch.Tensor  # [B, k, D] the last layer's states of the kept tokens ([CLS] in slot 0)
    index: torch.Tensor  # [B, k] original position of each slot
    mask: torch.Tensor  # [B, k] bool: the slot holds a kept token (rows keep different counts)
    kept: list[torch.Tensor] = field(default_factory=list)  # per layer, [B] tokens kept after it
    scores: list[torch.Tensor] = field(default_factory=list)  # per layer, [B, H, n, n] pre-softmax scores (collect)
    score_index: list[torch.Tensor] = field(default_factory=list)  # per layer, [B, n] positions the scores cover
    score_mask: list[torch.Tensor] = field(default_factory=list)  # per layer, [B, n] bool: real tokens among them
    states: list[torch.Tensor] = field(default_factory=list)  # per layer, its output [B, k, D] (collect)
    state_index: list[torch.Tensor] = field(default_factory=list)  # per layer, [B, k] positions of those states
    # per pruning layer: (its input states [B, n, D], [B, n] bool dropped there, [B, n] original positions)
    dropped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def check_ratios(ratios: Sequence[float], n_layers: int) -> list[float]:
    """A length configuration: one fraction in (0, 1] per layer, never increasing."""
    ratios = [float(r) for r in ratios]
    if len(ratios) != n_layers:
        raise SlmError(f"length configuration has {len(ratios)} ratios; the encoder has {n_layers} layers")
    if any(not 0.0 < r <= 1.0 for r in ratios):
        raise SlmError(f"length configuration {ratios}: every ratio must lie in (0, 1]")
    if any(b > a + 1e-9 for a, b in zip(ratios, ratios[1:])):
        raise SlmError(f"length configuration {ratios}: ratios must not increase from one layer to the next")
    return ratios


def kept_counts(n_real: torch.Tensor, ratio: float, previous: torch.Tensor) -> torch.Tensor:
    """Tokens a row keeps: ``ceil(ratio * n_real)``, at least 1 ([CLS]) and at most what it had."""
    counts = torch.ceil(n_real.double() * ratio - 1e-9).long().clamp(min=1)
    return torch.minimum(counts, previous)


def _attention_scores(layer: EncoderLayer, x: torch.Tensor, key_mask: torch.Tensor):
    attn = layer.attn
    b, t, _ = x.shape
    q, k, v = (proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2) for proj in (attn.q, attn.k, attn.v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    return scores, probs, v


def pruned_forward(model: EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   ratios: Sequence[float] | None = None, collect: bool = False,
                   keep_dropped: bool = False) -> PrunedOutput:
    """The encoder's forward with token pruning after each layer's attention (``ratios`` None: no pruning).

    ``collect`` keeps every layer's pre-softmax attention scores and output states (for distillation),
    ``keep_dropped`` the
    states of the tokens each layer drops (for the reconstruction loss)."""
    enc = model.encoder
    cfg: EncoderConfig = model.cfg
    if ratios is not None:
        ratios = check_ratios(ratios, cfg.n_layers)
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    x = enc.embeddings(input_ids)
    index = torch.arange(t, device=input_ids.device).expand(b, t)
    n_real = mask.sum(1)
    count = n_real.clone()
    out = PrunedOutput(x, index, mask)
    for i, layer in enumerate(enc.layers):
        scores, probs, v = _attention_scores(layer, x, mask)
        probs = probs * mask[:, None, :, None]  # padded queries give no attention
        if collect:
            out.scores.append(scores)
            out.score_index.append(index)
            out.score_mask.append(mask)
        if ratios is not None and ratios[i] < 1.0:
            significance = probs.sum(dim=(1, 2)).masked_fill(~mask, float("-inf"))
            significance[:, 0] = float("inf")  # [CLS] stays
            count = kept_counts(n_real, ratios[i], count)
            width = int(count.max())
            top = significance.topk(width, dim=1).indices  # [B, width], by significance
            slot_valid = torch.arange(width, device=x.device)[None, :] < count[:, None]
            # order the kept slots by position, invalid slots last, so [CLS] sits in slot 0
            order_key = torch.where(slot_valid, index.gather(1, top), torch.full_like(top, t + 1))
            top = top.gather(1, order_key.argsort(dim=1))
            if keep_dropped:  # real tokens of this layer not among the valid kept slots
                dropped = mask.clone()
                dropped.scatter_(1, top, dropped.gather(1, top) & ~slot_valid)
                out.dropped.append((x, dropped, index))
            gather = top[:, :, None]
            x_kept = x.gather(1, gather.expand(-1, -1, x.shape[-1]))
            probs = probs.gather(2, top[:, None, :, None].expand(-1, probs.shape[1], -1, probs.shape[3]))
            index, mask = index.gather(1, top), slot_valid
        else:
            x_kept = x
        h = (probs @ v).transpose(1, 2).reshape(b, x_kept.shape[1], -1)
        h = layer.attn_norm(x_kept + layer.dropout(layer.attn.o(h)))
        x = layer.mlp_norm(h + layer.dropout(layer.mlp(h)))
        x = x * mask[:, :, None]
        out.kept.append(mask.sum(1))
        if collect:
            out.states.append(x)
            out.state_index.append(index)
    out.hidden, out.index, out.mask = x, index, mask
    return out


def classify_pruned(model: EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    ratios: Sequence[float] | None) -> torch.Tensor:
    """Classification logits from the pruned forward ([CLS] is always kept in slot 0)."""
    return model.classifier(pruned_forward(model, input_ids, attention_mask, ratios).hidden)


def layer_flops(cfg: EncoderConfig, n_in: float, n_out: float) -> float:
    """FLOPs (2 per multiply-add) of the matrix products of one layer that reads ``n_in`` tokens and keeps
    ``n_out`` after its attention: q/k/v projections and the scores on all n_in tokens (the significance needs
    every query), the weighted values, output projection and feed-forward block on the n_out kept ones."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return 2.0 * (3 * n_in * d * d + n_in * n_in * d + n_out * n_in * d + n_out * d * d + 2 * n_out * d * f)


def encoder_flops(cfg: EncoderConfig, n_tokens: int, ratios: Sequence[float] | None = None) -> float:
    """FLOPs of the encoder layers on one row of ``n_tokens`` under a length configuration."""
    ratios = [1.0] * cfg.n_layers if ratios is None else check_ratios(ratios, cfg.n_layers)
    total, n = 0.0, n_tokens
    for r in ratios:
        kept = min(n, max(1, math.ceil(n_tokens * r - 1e-9)))
        total += layer_flops(cfg, n, kept)
        n = kept
    return total


def token_budget(ratios: Sequence[float]) -> float:
    """Mean fraction of the tokens the layers keep: the budget a length configuration spends."""
    return sum(ratios) / len(ratios)


__all__ = ["PrunedOutput", "check_ratios", "kept_counts", "pruned_forward", "classify_pruned", "run_layer", "layer_flops",
           "encoder_flops", "token_budget"]


def run_layer(layer: EncoderLayer, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder layer over every token of ``x`` [B, T, D] (``mask`` bool [B, T]): (output, pre-softmax
    attention scores [B, H, T, T])."""
    scores, probs, v = _attention_scores(layer, x, mask)
    b, t, _ = x.shape
    h = (probs @ v).transpose(1, 2).reshape(b, t, -1)
    h = layer.attn_norm(x + layer.dropout(layer.attn.o(h)))
    return layer.mlp_norm(h + layer.dropout(layer.mlp(h))), scores
