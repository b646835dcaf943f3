"""Token-level masks from a byte DFA, and the logits processor that applies them.

The vocabulary is a trie of its tokens' bytes, stored level by level (level ``k`` holds the distinct
``k+1``-byte prefixes, each with its parent's index and its last byte). The tokens allowed in a DFA state are
found by walking the whole trie at once with numpy: the states after ``k+1`` bytes are
``table[states_at_parents, last_bytes]``, and a token is allowed when the state at its node is live. A walk
costs one array lookup per trie node; each state is walked the first time it is
met and its mask kept (about 1 ms a state for SmolLM2's 49k tokens).

End-of-sequence is allowed exactly in accepting states; special tokens never are. In an accepting state with
no way on, EOS is the only choice, so generation stops when the constraint is complete.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import SlmError
from .automaton import DFA


class Vocabulary:
    """A tokenizer's token bytes as a level-by-level trie (see the module doc)."""

    def __init__(self, token_bytes: list[bytes | None]):
        self.token_bytes = token_bytes
        levels: list[dict[tuple[int, int], int]] = []
        ends: list[list[tuple[int, int]]] = []  # per level: (token id, node)
        for token, data in enumerate(token_bytes):
            if not data:
                continue
            node = 0
            for k, byte in enumerate(data):
                if k == len(levels):
                    levels.append({})
                    ends.append([])
                node = levels[k].setdefault((node, byte), len(levels[k]))
            ends[len(data) - 1].append((token, node))
        self.parents = [np.fromiter((p for p, _ in level), np.int64, len(level)) for level in levels]
        self.bytes = [np.fromiter((b for _, b in level), np.int64, len(level)) for level in levels]
        self.end_tokens = [np.array([t for t, _ in e], dtype=np.int64) for e in ends]
        self.end_nodes = [np.array([n for _, n in e], dtype=np.int64) for e in ends]
        self.size = len(token_bytes)

    def allowed(self, dfa: DFA, state: int) -> np.ndarray:
        """The ids of the (non-special) tokens whose bytes keep ``dfa`` live from ``state``, sorted."""
        found = []
        current = np.array([state], dtype=np.int64)
        for parents, last, tokens, nodes in zip(self.parents, self.bytes, self.end_tokens, self.end_nodes):
            current = dfa.table[current[parents], last]
            live = current != dfa.dead
            if not live.any():
                break
            if len(tokens):
                found.append(tokens[live[nodes]])
        return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


_VOCABULARIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocabulary_of(tokenizer) -> Vocabulary:
    """The (cached) ``Vocabulary`` of an ``slmkit.tokenizer.Tokenizer``."""
    vocab = _VOCABULARIES.get(tokenizer)
    if vocab is None:
        vocab = _VOCABULARIES[tokenizer] = Vocabulary(tokenizer.token_bytes())
    return vocab


class TokenMasks:
    """For each DFA state (computed on first use, then kept): the tokens that may come next."""

    def __init__(self, dfa: DFA, vocab: Vocabulary, eos_ids):
        eos = sorted({int(i) for i in eos_ids})
        if not eos:
            raise SlmError("constrained decoding needs the model's end-of-sequence token, and it has none")
        self.dfa, self.vocab, self.eos_ids = dfa, vocab, eos
        self._ids: dict[int, np.ndarray] = {}
        self._index: dict[tuple, tuple[bool, torch.Tensor]] = {}  # (state, vocab size, device) -> ids

    def allowed(self, state: int) -> np.ndarray:
        """Token ids allowed in ``state`` (EOS included when the state accepts)."""
        ids = self._ids.get(state)
        if ids is None:
            if state == self.dfa.dead:
                raise SlmError("constrained decoding reached a dead state")
            ids = self.vocab.allowed(self.dfa, state)
            if self.dfa.accepting[state]:
                ids = np.union1d(ids, np.array(self.eos_ids, dtype=np.int64))
            if not len(ids):
                raise SlmError("no token of the vocabulary continues the constrained output here (the tokenizer "
                               "lacks the bytes the constraint needs next)")
            self._ids[state] = ids
        return ids

    def apply(self, row: torch.Tensor, state: int | None) -> None:
        """Set the logits [V] of every token not allowed in ``state`` to -inf, in place (``state`` None: the
        output is finished, only EOS is allowed). Each state keeps the shorter of two index lists -- the allowed
        ids (few, between JSON tokens) or the banned ones (few, inside a string) -- which is several times
        faster than a boolean mask over the whole vocabulary."""
        size = row.shape[-1]
        key = (state, size, str(row.device))
        entry = self._index.get(key)
        if entry is None:
            ids = np.array(self.eos_ids, dtype=np.int64) if state is None else self.allowed(state)
            ids = ids[ids < size]
            keep = len(ids) <= size // 2
            index = ids if keep else np.setdiff1d(np.arange(size, dtype=np.int64), ids, assume_unique=True)
            entry = self._index[key] = (keep, torch.from_numpy(index).to(row.device))
        keep, index = entry
        if keep:
            kept = row.index_select(0, index)
            row.fill_(float("-inf")).index_copy_(0, index, kept)
        else:
            row.index_fill_(0, index, float("-inf"))


@dataclass
class _Row:
    prompt: list[int]
    used: int = 0  # generated tokens already walked
    state: int = 0
    done: bool = False  # EOS was generated (with ignore_eos generation may go on: EOS only, then)


class ConstrainedLogits:
    """A logits processor (see ``engine.sampling``) that lets only tokens continuing the constraint through.

    Each row's prompt is recorded the first time the row is seen (its context then holds just the prompt); the
    tokens after it are walked through the DFA as they arrive. One instance serves one generation (rows keyed
    by their index; a row whose context no longer starts with its recorded prompt starts over), so the server
    makes one per sequence and the Python API one per call; the DFA and the masks are shared.
    """

    def __init__(self, masks: TokenMasks):
        self.masks = masks
        self.rows: dict[int, _Row] = {}

    def __call__(self, logits: torch.Tensor, context: list[list[int]]) -> torch.Tensor:
        for i, ids in enumerate(context):
            self.masks.apply(logits[i], self._state(i, ids))
        return logits

    def _state(self, i: int, ids: list[int]) -> int | None:
        row = self.rows.get(i)
        if row is None or len(ids) < len(row.prompt) + row.used or ids[:len(row.prompt)] != row.prompt:
            row = self.rows[i] = _Row(list(ids))
        new = ids[len(row.prompt) + row.used:]
        for token in new:
            row.used += 1
            if row.done:
                continue
            if token in self.masks.eos_ids:
                row.done = True
                continue
            data = self.masks.vocab.token_bytes[token] if 0 <= token < self.masks.vocab.size else None
            state = self.masks.dfa.dead if data is None else self.masks.dfa.step(row.state, data)
            if state == self.masks.dfa.dead:
                raise SlmError(f"token {token} ({data!r}) does not continue the constrained output; a "
                               "constrained-decoding processor serves one generation (make a new one per call)")
            row.state = state
        return None if row.done else row.state

    def __repr__(self) -> str:
        return f"ConstrainedLogits({self.masks.dfa.num_states} states)"
