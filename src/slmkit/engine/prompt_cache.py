"""Reuse of a shared prompt prefix: its keys and values are computed once and copied into each batch.

Methods that ask a model many questions behind one long, fixed context (SuperICL's 32 demonstrations,
few-shot evaluation, a system prompt) pay for that context once instead of once per prompt. A
:class:`PromptCache` remembers the keys/values of the last prefix it computed, as llama.cpp's prompt cache
does: a new batch reuses the longest run of leading tokens it shares with that prefix and computes only the
rest. Keys and values of a causal model depend only on the tokens before them, so a reused prefix gives the
numbers its tokens would give in place (up to float rounding of a different chunking).
"""

from __future__ import annotations

import torch


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """The keys/values of one prefix (batch 1), extended or replaced as batches come.

    ``min_tokens``: a shared prefix shorter than this is not worth a separate pass (the batch runs as usual).
    ``hits`` / ``reused_tokens`` count what was taken from the cache; ``computed_tokens`` what was computed
    for it."""

    def __init__(self, min_tokens: int = 32):
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.keys: list[torch.Tensor] = []  # per layer [1, kv_heads, len(ids), head_dim]
        self.values: list[torch.Tensor] = []
        self.owner: int | None = None  # id() of the model the tensors belong to
        self.hits = self.reused_tokens = self.computed_tokens = 0

    def shared_prefix(self, prompts: list[list[int]]) -> int:
        """How many leading tokens every prompt shares, leaving each at least one token of its own (the step
        that gives its first logits)."""
        n = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for p in prompts[1:]:
            n = min(n, common_prefix_length(first, p))
        return max(n, 0)

    def prefix_for(self, model, prompts: list[list[int]], run_prefix) -> int:
        """Make the cache hold the batch's shared prefix (computing what it lacks with ``run_prefix(ids,
        start, keys, values)``, which extends the given per-layer tensors from slot ``start``); return its
        length, or 0 when the batch shares too little to use it."""
        n = self.shared_prefix(prompts)
        if n < self.min_tokens:
            return 0
        wanted = prompts[0][:n]
        keep = common_prefix_length(self.ids, wanted) if self.owner == id(model) else 0
        if keep < self.min_tokens:
            keep = 0
        if keep:
            self.hits += 1
            self.reused_tokens += keep
        keys = [k[:, :, :keep] for k in self.keys] if keep else None
        values = [v[:, :, :keep] for v in self.values] if keep else None
        if keep < n:
            keys, values = run_prefix(wanted, keep, keys, values)
            self.computed_tokens += n - keep
        self.ids, self.keys, self.values, self.owner = wanted, keys, values, id(model)
        return n

    def clear(self) -> None:
        self.ids, self.keys, self.values, self.owner = [], [], [], None
