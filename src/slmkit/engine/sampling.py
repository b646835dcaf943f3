"""Next-token selection: greedy, or sampling after repetition penalty, temperature, top-k, top-p, min-p.

The order follows transformers' logits processors: penalty, temperature, top-k, top-p, min-p.

Logits processors
-----------------
Before any of that, ``next_tokens`` runs the callables in ``SamplingParams.logits_processors``, in order, so
that greedy decoding and sampling both choose from their output. A processor is any callable::

    proc(logits: Tensor[B, V] float32, context: list[list[int]]) -> Tensor[B, V]

``context[i]`` is row ``i``'s token ids so far: its prompt (without padding) followed by the tokens generated
for it, the last of which produced ``logits[i]``. The lists are fresh for every call, so a processor may keep
them. ``logits`` is the processor's own copy: it may change it in place, but must return the result (a
tensor of the same shape; it goes on as float32). Rows that have already finished in a batch keep being
passed (their context no longer grows; the token chosen for them is discarded). A processor that masks
a token sets its logit to ``-inf``; masking every token of a row is an error. The continuous batcher calls
each request's processors with a batch of one row. Log-probabilities the server reports are still the
model's own.

Uses: constrained decoding (``AllowedTokens``, ``BannedTokens``), combining models by adding or
subtracting their log-probabilities (emulated fine-tuning), a draft model's proposals. The repetition
penalty is available as a processor too (``RepetitionPenalty``); ``repetition_penalty=`` still runs on the
engine's own token history, with the same result. With no processors (the default) nothing extra runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from ..errors import SlmError

LogitsProcessor = Callable[[torch.Tensor, "list[list[int]]"], torch.Tensor]


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
    logits_processors: tuple = ()  # callables (logits [B, V], context) -> logits, run first (see the module doc)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.logits_processors = _check_processors(self.logits_processors)
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


def _check_processors(processors) -> tuple:
    if processors is None:
        return ()
    if callable(processors):
        return (processors,)  # a single processor
    if isinstance(processors, (str, bytes)) or not isinstance(processors, Iterable):
        raise SlmError(f"logits_processors must be a list of callables (logits, context) -> logits, "
                       f"got {processors!r}")
    processors = tuple(processors)
    for i, proc in enumerate(processors):
        if not callable(proc):
            raise SlmError(f"logits_processors[{i}] is not callable: {proc!r} (a processor is a callable "
                           f"(logits [batch, vocab], context: list of token id lists) -> logits)")
    return processors


def apply_logits_processors(logits: torch.Tensor, processors: Sequence[LogitsProcessor],
                            context: list[list[int]]) -> torch.Tensor:
    """Run ``processors`` in order on a float32 copy of ``logits`` [B, V]; ``context[i]``: row i's ids so far."""
    if len(context) != logits.shape[0]:
        raise SlmError(f"logits processors got {len(context)} context rows for {logits.shape[0]} rows of logits")
    shape = logits.shape
    logits = logits.float().clone()  # the processors' own: the caller's tensor is not touched
    for proc in processors:
        out = proc(logits, context)
        if not isinstance(out, torch.Tensor) or out.shape != shape:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else repr(out)
            raise SlmError(f"logits processor {proc!r} returned {got}; it must return the logits, a tensor of "
                           f"shape {tuple(shape)}")
        logits = out.float()
    dead = torch.isneginf(logits).all(-1) | torch.isnan(logits).any(-1)
    if bool(dead.any()):
        row = int(dead.nonzero()[0, 0])
        raise SlmError(f"the logits processors left no token to choose in row {row} (every logit -inf, or NaN)")
    return logits


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
                generator: torch.Generator | None, context: list[list[int]] | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` [B, V]. ``seen`` [B, N]: the ids the repetition penalty applies to;
    ``context``: each row's ids so far, for ``p.logits_processors`` (needed only when there are some)."""
    if p.logits_processors:
        if context is None:
            raise SlmError("logits processors need each row's token ids so far (context), and none were given")
        logits = apply_logits_processors(logits, p.logits_processors, context)
    logits = logits.float()
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------- ready processors
def _token_ids(ids, what: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    elif isinstance(ids, Integral):
        ids = [ids]
    try:
        ids = list(ids)
    except TypeError:
        raise SlmError(f"{what} needs token ids (a list of integers), got {ids!r}") from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, Integral) or i < 0:
            raise SlmError(f"{what}: token ids must be integers >= 0, got {i!r}")
    return sorted({int(i) for i in ids})


class _TokenMask:
    def __init__(self, ids, what: str):
        self.ids = _token_ids(ids, what)
        self._what = what
        self._index: dict = {}  # device -> index tensor

    def index(self, logits: torch.Tensor) -> torch.Tensor:
        if self.ids and self.ids[-1] >= logits.shape[-1]:
            raise SlmError(f"{self._what}: token id {self.ids[-1]} is outside the vocabulary of "
                           f"{logits.shape[-1]} tokens")
        index = self._index.get(logits.device)
        if index is None:
            index = self._index[logits.device] = torch.tensor(self.ids, dtype=torch.long, device=logits.device)
        return index

    def __repr__(self) -> str:
        shown = ", ".join(map(str, self.ids[:8])) + (", ..." if len(self.ids) > 8 else "")
        return f"{type(self).__name__}([{shown}])"


class BannedTokens(_TokenMask):
    """A logits processor that never lets the given token ids be chosen (their logits become -inf)."""

    def __init__(self, ids):
        super().__init__(ids, "BannedTokens")

    def __call__(self, logits: torch.Tensor, context: list[list[int]]) -> torch.Tensor:
        if not self.ids:
            return logits
        return logits.index_fill(-1, self.index(logits), float("-inf"))


class AllowedTokens(_TokenMask):
    """A logits processor that lets only the given token ids be chosen (every other logit becomes -inf)."""

    def __init__(self, ids):
        super().__init__(ids, "AllowedTokens")
        if not self.ids:
            raise SlmError("AllowedTokens needs at least one token id")

    def __call__(self, logits: torch.Tensor, context: list[list[int]]) -> torch.Tensor:
        index = self.index(logits)
        out = torch.full_like(logits, float("-inf"))
        out[:, index] = logits[:, index]
        return out


class RepetitionPenalty:
    """``repetition_penalty=`` as a logits processor: the CTRL penalty on every id in each row's context."""

    def __init__(self, penalty: float):
        if isinstance(penalty, bool) or not isinstance(penalty, Real) or penalty <= 0:
            raise SlmError(f"RepetitionPenalty needs a number > 0, got {penalty!r}")
        self.penalty = float(penalty)

    def __call__(self, logits: torch.Tensor, context: list[list[int]]) -> torch.Tensor:
        if self.penalty == 1.0 or not any(context):
            return logits
        n = max(len(c) for c in context)
        # ragged rows are filled with one of their own ids (a repeat adds no penalty); an empty row gets none
        rows = [c + [c[0]] * (n - len(c)) if c else None for c in context]
        seen = torch.tensor([r if r is not None else [0] * n for r in rows], dtype=torch.long, device=logits.device)
        out = apply_repetition_penalty(logits, seen, self.penalty)
        empty = [i for i, r in enumerate(rows) if r is None]
        if empty:
            out[empty] = logits[empty]
        return out

    def __repr__(self) -> str:
        return f"RepetitionPenalty({self.penalty})"
