"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes ``gamma``
tokens, the target model scores them all in one forward pass, and each draft token x is kept with probability
min(1, p(x) / q(x)); the first rejected one is replaced by a sample of the residual max(0, p - q)
(renormalised), and when all are kept the target's next distribution gives one bonus token. The output is
distributed exactly as the target's own samples; greedy (temperature 0) gives the target's greedy tokens.
Both models keep their own KV cache (engine.combine.Stream), rewound past rejected tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SlmError
from .combine import Ensemble, Stream, check_shared_vocab
from .generate import Completion, check_context
from .sampling import SamplingParams, filter_logits, make_generator


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)  # one entry per target forward pass

    @property
    def rounds(self) -> int:
        return len(self.accepted_per_round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities tokens are sampled from: one-hot at the argmax when greedy, else temperature and
    top-k / top-p / min-p as in plain sampling."""
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits, params).softmax(-1)


def _draw(probs: torch.Tensor, generator) -> int:
    if generator is None:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def speculative_generate(target, draft, prompt: Sequence[int], params: SamplingParams, gamma: int = 4,
                         eos_ids: set[int] = frozenset(), tokenizers: Sequence | None = None,
                         tokenizer=None) -> tuple[Completion, SpeculativeStats]:
    """Decode ``prompt`` with ``target`` (a model, or an engine.combine.Ensemble such as EFT's up-scaled
    distribution), ``draft`` proposing ``gamma`` tokens per target pass."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise SlmError(f"gamma (draft tokens per round) must be an integer >= 1, got {gamma!r}")
    if params.repetition_penalty != 1.0 or params.logits_processors:
        raise SlmError("speculative decoding supports temperature, top-k, top-p and min-p; not the repetition "
                       "penalty or logits processors")
    targets = target.models if isinstance(target, Ensemble) else [target]
    vocab = check_shared_vocab(targets + [draft], tokenizers)
    prompt = list(prompt)
    if not prompt:
        raise SlmError("speculative decoding needs a non-empty prompt")
    for m in targets + [draft]:
        check_context(len(prompt), params.max_new_tokens + gamma, m.cfg.max_position_embeddings)
    room = len(prompt) + params.max_new_tokens + gamma + 1
    t_stream = target.stream(room) if isinstance(target, Ensemble) else Stream(target, room)
    d_stream = Stream(draft, room)
    generator = make_generator(params, target.device)
    stats = SpeculativeStats()
    out: list[int] = []
    t_pending, d_pending = list(prompt), list(prompt)  # committed tokens each model has not yet read
    finish = "length"
    while len(out) < params.max_new_tokens:
        committed = len(prompt) + len(out)
        k = min(gamma, params.max_new_tokens - len(out) - 1)
        drafts, qs = [], []
        if k:
            d_logits = d_stream.feed_logits(d_pending, 1)[-1, :vocab]
            for j in range(k):
                q = distribution(d_logits, params)
                drafts.append(_draw(q, generator))
                qs.append(q)
                if j < k - 1:
                    d_logits = d_stream.feed_logits([drafts[-1]], 1)[-1, :vocab]
        t_logits = t_stream.feed_logits(t_pending + drafts, k + 1)[:, :vocab]
        ps = [distribution(t_logits[i], params) for i in range(k + 1)]
        accepted = 0
        new: list[int] = []
        for i, x in enumerate(drafts):
            ratio = float(ps[i][x]) / max(float(qs[i][x]), 1e-30)
            keep = ratio >= 1.0 if generator is None else float(torch.rand((), generator=generator)) < min(1.0, ratio)
            if not keep:
                residual = (ps[i] - qs[i]).clamp(min=0)
                residual = residual / residual.sum() if float(residual.sum()) > 0 else ps[i]
                new.append(_draw(residual, generator))
                break
            accepted += 1
            new.append(x)
        else:
            new.append(_draw(ps[k], generator))  # every draft kept: the bonus token
        stats.drafted += k
        stats.accepted += accepted
        stats.accepted_per_round.append(accepted)
        t_stream.rewind(committed + accepted)
        t_pending = [new[-1]]
        if k == 0:
            d_pending = d_pending + new
        elif accepted == k:  # the draft never read its own last proposal
            d_pending = [drafts[-1], new[-1]]
        else:
            d_stream.rewind(committed + accepted)
            d_pending = [new[-1]]
        for token in new:
            if token in eos_ids:
                finish = "stop"
                break
            out.append(token)
        if finish == "stop":
            break
    text = tokenizer.decode(out) if tokenizer is not None else ""
    return Completion(text, out, finish, len(prompt)), stats
