"""Several models on one token stream, their next-token log-probabilities combined per token.

Each model keeps its own KV cache (:class:`Stream`) and all of them are fed the same tokens in lock-step.
Emulated fine-tuning (Mitchell et al., 2023) is one combination: a base model plus weighted differences of
fine-tuned and reference models,

    log p(x) = log p_base(x) + sum_i w_i * (log p_ft_i(x) - log p_ref_i(x)),   renormalised over x,

so up-scaling is ``base`` = large base, one delta (small fine-tuned, small base) with ``w`` = beta, and the
helpful/harmless interpolation is two deltas with weights ``beta * lam`` and ``beta * (1 - lam)``. With every
weight 0 the combination is the base model's own distribution. Every model must share one tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import SlmError
from .generate import Completion, check_context, prefill
from .kv_cache import KVCache
from .sampling import SamplingParams, make_generator, next_tokens


class Stream:
    """One model's pass over a growing token sequence (batch 1) with its own KV cache of ``max_len`` slots;
    :meth:`feed` appends tokens and returns the next-token log-probabilities [V] in float32."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len, self.length = model, int(max_len), 0
        self.cache = KVCache(model.cfg, 1, self.max_len, getattr(model, "cache_dtype", model.dtype), model.device)

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens``; the next-token log-probabilities [V] after the last of them (float32)."""
        return torch.log_softmax(self.feed_logits(tokens, 1)[-1], dim=-1)

    @torch.no_grad()
    def feed_logits(self, tokens: Sequence[int], last: int) -> torch.Tensor:
        """Append ``tokens``; the raw logits [last, V] (float32) after each of the last ``last`` of them.

        The logits are the ones plain decoding computes for the same tokens: the stream's first tokens (the
        prompt) are read by a chunked prefill, as generation reads a prompt, and every later token as a
        one-token decoding step computes it (``stepwise``), so a verify pass over several draft tokens
        agrees to the bit with token-by-token decoding on compact models."""
        tokens = list(tokens)
        if not 1 <= last <= len(tokens):
            raise SlmError(f"feed_logits: last must be in 1..{len(tokens)}, got {last}")
        rows = []
        if self.length == 0:  # the prompt, up to the first scored position
            split = len(tokens) - last + 1
            ids, positions = self._place(tokens[:split])
            rows.append(prefill(self.model, ids, positions, None, self.cache).float())
            self.length = split
            tokens = tokens[split:]
        if tokens:
            ids, positions = self._place(tokens)
            logits = self.model(ids, positions, None, self.cache, self.length, stepwise=True)[0].float()
            self.length += len(tokens)
            rows.append(logits[len(tokens) - (last - len(rows)):])
        return torch.cat(rows)

    def _place(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` as ids [1, T] and their positions, after checking they fit."""
        if not tokens:
            raise SlmError("a stream needs at least one token to advance")
        if self.length + len(tokens) > self.max_len:
            raise SlmError(f"stream of {self.max_len} tokens is full ({self.length} + {len(tokens)})")
        device = self.model.device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        return ids, torch.arange(self.length, self.length + len(tokens), device=device)[None]

    def rewind(self, length: int) -> None:
        """Forget every token after the first ``length`` (their cache slots are overwritten later)."""
        if not 0 <= length <= self.length:
            raise SlmError(f"cannot rewind a stream of {self.length} tokens to {length}")
        self.length = length


@dataclass
class Delta:
    """``weight * (log p_tuned - log p_reference)``: what fine-tuning changed, scaled."""

    tuned: object  # a Decoder
    reference: object
    weight: float


def eft_deltas(small_tuned, small_base, beta: float = 1.0, harmless=None, lam: float = 1.0) -> list[Delta]:
    """EFT's deltas: up-scaling with ``beta``; with ``harmless`` (a second fine-tune of ``small_base``),
    the helpful/harmless mix ``lam`` * helpful + (1 - ``lam``) * harmless."""
    for name, value in (("beta", beta), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SlmError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= lam <= 1.0:
        raise SlmError(f"lam must be in [0, 1], got {lam}")
    if harmless is None:
        return [Delta(small_tuned, small_base, float(beta))]
    return [Delta(small_tuned, small_base, float(beta) * lam), Delta(harmless, small_base, float(beta) * (1 - lam))]


def combine(base: torch.Tensor, deltas: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``log_softmax(base + sum w * (tuned - reference))`` over the vocabulary (all are log-probabilities)."""
    scores = base.clone()
    for weight, tuned, reference in deltas:
        if weight:
            scores += weight * (tuned - reference)
    return torch.log_softmax(scores, dim=-1)


def check_shared_vocab(models: Sequence, tokenizers: Sequence | None = None) -> int:
    """The vocabulary the models share (the smallest head; rows past a tokenizer's end are padding); a clear
    error when the tokenizers differ, since then one token id means different text to different models."""
    if tokenizers:
        first = tokenizers[0].backend.get_vocab(with_added_tokens=True)
        for i, tok in enumerate(tokenizers[1:], 1):
            other = tok.backend.get_vocab(with_added_tokens=True)
            if other != first:
                differ = sorted(set(first.items()) ^ set(other.items()), key=lambda kv: kv[1])[:3]
                raise SlmError(f"models 0 and {i} have different tokenizers ({len(first)} and {len(other)} "
                               f"tokens; e.g. {differ}): combining their token probabilities needs one tokenizer")
        return min(len(first), min(m.cfg.vocab_size for m in models))
    sizes = {m.cfg.vocab_size for m in models}
    if len(sizes) != 1:
        raise SlmError(f"models have different vocabulary sizes {sorted(sizes)}; pass their tokenizers to check "
                       f"that they share one")
    return sizes.pop()


class Ensemble:
    """A base model and deltas as one model: its stream's next-token scores are the combined log-probabilities
    (:func:`combine`), so speculative decoding can take the EFT distribution as its target."""

    def __init__(self, base, deltas: Sequence[Delta], tokenizers: Sequence | None = None):
        self.base, self.deltas = base, list(deltas)
        self.models = [base] + [m for d in self.deltas for m in (d.tuned, d.reference)]
        self.vocab = check_shared_vocab(self.models, tokenizers)
        self.cfg, self.device = base.cfg, base.device

    def stream(self, max_len: int) -> "EnsembleStream":
        return EnsembleStream(self, max_len)


class EnsembleStream:
    """Every distinct model of an :class:`Ensemble` on one token stream (each once, with its own cache)."""

    def __init__(self, ensemble: Ensemble, max_len: int):
        self.ensemble = ensemble
        self.streams: dict[int, Stream] = {}
        for m in ensemble.models:
            self.streams.setdefault(id(m), Stream(m, max_len))

    @property
    def length(self) -> int:
        return next(iter(self.streams.values())).length

    def feed_logits(self, tokens: Sequence[int], last: int) -> torch.Tensor:
        """Append ``tokens``; the combined log-probabilities [last, vocab] after each of the last ``last``."""
        vocab = self.ensemble.vocab
        logp = {key: torch.log_softmax(s.feed_logits(tokens, last)[:, :vocab], dim=-1)
                for key, s in self.streams.items()}
        e = self.ensemble
        return combine(logp[id(e.base)], [(d.weight, logp[id(d.tuned)], logp[id(d.reference)]) for d in e.deltas])

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        return self.feed_logits(tokens, 1)[-1]

    def rewind(self, length: int) -> None:
        for s in self.streams.values():
            s.rewind(length)


def generate_combined(base, deltas: Sequence[Delta], prompt: Sequence[int], params: SamplingParams,
                      eos_ids: set[int] = frozenset(), tokenizer=None, tokenizers: Sequence | None = None,
                      ) -> Completion:
    """Decode one prompt from the combined distribution of ``base`` and ``deltas`` (greedy or sampled with
    ``params``; stop strings need ``tokenizer``). Each distinct model runs once per token."""
    ensemble = Ensemble(base, deltas, tokenizers)
    prompt = list(prompt)
    if not prompt:
        raise SlmError("generate_combined needs a non-empty prompt")
    for m in ensemble.models:
        check_context(len(prompt), params.max_new_tokens, m.cfg.max_position_embeddings)
    stream = ensemble.stream(len(prompt) + params.max_new_tokens)
    generator = make_generator(params, base.device)
    penalize = params.repetition_penalty != 1.0
    ids: list[int] = []
    finish = "length"
    fed = prompt
    for step in range(params.max_new_tokens):
        scores = stream.feed(fed)
        so_far = prompt + ids if penalize or params.logits_processors else None
        seen = torch.tensor([so_far], dtype=torch.long) if penalize else None
        token = int(next_tokens(scores[None], params, seen, generator, [so_far] if so_far else None)[0])
        if token in eos_ids:
            finish = "stop"
            break
        ids.append(token)
        if params.stop and tokenizer is not None:
            text = tokenizer.decode(ids)
            hit = [text.find(s) for s in params.stop if s in text]
            if hit:
                return Completion(text[:min(hit)], ids, "stop", len(prompt))
        fed = [token]
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    return Completion(text, ids, finish, len(prompt))
