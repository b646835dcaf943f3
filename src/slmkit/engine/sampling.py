"""Next-token selection: greedy, or sampling after repetition penalty, temperature, top-k, top-p, min-p.

The order follows transformers' logits processors: penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from ..errors import SlmError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        # Types first, so that a float token count or a string temperature is a named SlmError rather than
        # a TypeError from deep inside torch (or from a comparison below).
        for name in ("max_new_tokens", "top_k") + (("seed",) if self.seed is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise SlmError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise SlmError(f"{name} must be a number, got {value!r}")
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),  # as transformers' MinPLogitsWarper
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SlmError(message)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id in ``seen`` [B, N]: divide positive logits, multiply negative."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with the tokens removed by top-k / top-p / min-p set to -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - p.top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        threshold = p.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def make_generator(p: SamplingParams, device) -> torch.Generator | None:
    """The random generator for sampling with ``p`` (None when greedy): seeded when ``p.seed`` is set, else
    freshly random for this generator only (torch.seed() would reseed the global RNG)."""
    if p.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if p.seed is not None:
        generator.manual_seed(p.seed)
    else:
        generator.seed()
    return generator


def next_tokens(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of ``logits`` [B, V]."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
