"""Regex syntax tree -> NFA over UTF-8 bytes (Thompson) -> minimal DFA over bytes.

Working on bytes rather than characters lets a vocabulary token that ends inside a multi-byte character (common
in byte-level BPE) be walked like any other: the DFA simply sits between the character's bytes.

The DFA keeps only live states (from which an accepting state can still be reached) and one extra ``dead``
state, the last, that every missing transition leads to. Its table is a numpy array ``[states, 256]``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ...errors import SlmError, UnsupportedError
from .charset import CharSet, utf8_sequences
from .regex import Alternate, Chars, Concat, Repeat

MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 30_000


class _NFA:
    """States are indices; ``eps[s]``: epsilon targets; ``edges[s]``: ``(lo, hi, target)`` byte ranges."""

    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise UnsupportedError(f"the constraint is too large to compile (more than {MAX_NFA_STATES} automaton "
                                   "states); use smaller repeat counts or fewer alternatives")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node, start: int) -> int:
        """Add ``node`` starting at ``start``; return its end state."""
        if isinstance(node, Chars):
            return self.chars(node.chars, start)
        if isinstance(node, Concat):
            for item in node.items:
                start = self.build(item, start)
            return start
        if isinstance(node, Alternate):
            end = self.state()
            for option in node.options:
                s = self.state()
                self.eps[start].append(s)
                self.eps[self.build(option, s)].append(end)
            return end
        if isinstance(node, Repeat):
            for _ in range(node.low):
                start = self.build(node.item, start)
            if node.high is None:  # a loop: start -> item -> start, leaving by epsilon
                loop = self.state()
                self.eps[start].append(loop)
                self.eps[self.build(node.item, loop)].append(loop)
                return loop
            end = self.state()
            for _ in range(node.high - node.low):  # nested optional copies: x(x(x)?)?
                self.eps[start].append(end)
                start = self.build(node.item, start)
            self.eps[start].append(end)
            return end
        raise TypeError(f"not a regex tree node: {node!r}")

    def chars(self, charset: CharSet, start: int) -> int:
        end = self.state()
        for sequence in _sequences(charset):
            s = start
            for i, (lo, hi) in enumerate(sequence):
                t = end if i == len(sequence) - 1 else self.state()
                self.edges[s].append((lo, hi, t))
                s = t
        return end


@lru_cache(maxsize=256)
def _sequences(charset: CharSet) -> list:
    return utf8_sequences(charset)


class DFA:
    """A deterministic automaton over bytes: state 0 starts, ``dead`` (the last state) never accepts."""

    def __init__(self, table: np.ndarray, accepting: np.ndarray):
        self.table = table  # [states, 256] int32, the next state for every byte
        self.accepting = accepting  # [states] bool
        self.dead = len(table) - 1
        # a live state with no way on: the match is complete and only the end may follow
        self.final = accepting & (table == self.dead).all(axis=1)

    @property
    def num_states(self) -> int:
        return len(self.table)

    def step(self, state: int, data: bytes) -> int:
        for b in data:
            state = int(self.table[state, b])
            if state == self.dead:
                break
        return state

    def matches(self, data: bytes) -> bool:
        return bool(self.accepting[self.step(0, data)])

    def max_length(self) -> int | None:
        """The most bytes an accepted string can have (None when there is no limit: a loop)."""
        n = self.dead
        succ = [sorted({int(t) for t in row if t != self.dead}) for row in self.table[:n]]
        longest: dict[int, int] = {}
        visiting: set[int] = set()
        for root in range(n):  # iterative depth-first search for the longest path, in bytes
            if root in longest:
                continue
            stack = [(root, iter(succ[root]))]
            visiting.add(root)
            while stack:
                s, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    visiting.discard(s)
                    best = max((longest[c] + 1 for c in succ[s]), default=0)
                    longest[s] = best
                    continue
                if child in visiting:
                    return None
                if child not in longest:
                    visiting.add(child)
                    stack.append((child, iter(succ[child])))
        return longest[0]


def compile_dfa(tree) -> DFA:
    """The minimal DFA over UTF-8 bytes that accepts exactly the texts ``tree`` matches."""
    nfa = _NFA()
    start = nfa.state()
    accept = nfa.build(tree, start)
    table, accepting = _determinize(nfa, start, accept)
    table, accepting = _prune(table, accepting)
    if not accepting.any():
        raise SlmError("the constraint matches no text at all")
    return DFA(*_minimize(table, accepting))


def _byte_classes(nfa: _NFA) -> np.ndarray:
    """Byte -> class, where bytes of one class go the same way from every NFA state."""
    cuts = np.zeros(257, dtype=bool)
    for edges in nfa.edges:
        for lo, hi, _ in edges:
            cuts[lo] = cuts[hi + 1] = True
    cuts[0] = False
    return np.cumsum(cuts[:256]).astype(np.int64)


def _determinize(nfa: _NFA, start: int, accept: int) -> tuple[np.ndarray, np.ndarray]:
    """Subset construction over byte classes; returns the full byte table and the accepting flags."""
    classes = _byte_classes(nfa)
    n_classes = int(classes[-1]) + 1
    closures: dict[frozenset, frozenset] = {}  # a set of move targets -> its closure
    by_class: dict[int, list[tuple[int, int]]] = {}  # NFA state -> [(byte class, target)]

    def closure(states) -> frozenset:
        out, todo = set(states), list(states)
        while todo:
            for t in nfa.eps[todo.pop()]:
                if t not in out:
                    out.add(t)
                    todo.append(t)
        return frozenset(out)

    initial = closure([start])
    index = {initial: 0}
    order = [initial]
    rows: list[list[int]] = []
    while len(rows) < len(order):
        current = order[len(rows)]
        moves: dict[int, set[int]] = {}
        for s in current:
            spans = by_class.get(s)
            if spans is None:  # this NFA state's edges, per byte class, worked out once
                spans = by_class[s] = [(c, t) for lo, hi, t in nfa.edges[s]
                                       for c in range(int(classes[lo]), int(classes[hi]) + 1)]
            for c, t in spans:
                if c in moves:
                    moves[c].add(t)
                else:
                    moves[c] = {t}
        row = [-1] * n_classes
        seen: dict[frozenset, int] = {}
        for c, targets in moves.items():
            key = frozenset(targets)
            if key in seen:  # classes that lead to the same NFA states (common): one lookup
                row[c] = seen[key]
                continue
            target = closures.get(key)
            if target is None:
                target = closures[key] = closure(key)
            if target not in index:
                if len(order) >= MAX_DFA_STATES:
                    raise UnsupportedError(f"the constraint is too large to compile (more than {MAX_DFA_STATES} "
                                           "automaton states); use smaller repeat counts or fewer alternatives")
                index[target] = len(order)
                order.append(target)
            row[c] = seen[key] = index[target]
        rows.append(row)
    dead = len(order)
    by_class = np.array(rows + [[-1] * n_classes], dtype=np.int64)
    by_class[by_class < 0] = dead
    accepting = np.array([accept in s for s in order] + [False])
    return by_class[:, classes], accepting


def _prune(table: np.ndarray, accepting: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the states no accepting state can be reached from (and those unreachable from the start); add one
    dead state at the end."""
    n = len(table)
    reverse: list[list[int]] = [[] for _ in range(n)]
    for s in range(n):
        for t in set(table[s].tolist()):
            reverse[t].append(s)
    live = accepting.copy()
    todo = list(np.flatnonzero(accepting))
    while todo:
        for s in reverse[todo.pop()]:
            if not live[s]:
                live[s] = True
                todo.append(s)
    reached = np.zeros(n, dtype=bool)
    if live[0]:
        reached[0] = True
        todo = [0]
        while todo:
            for t in set(table[todo.pop()].tolist()):
                if live[t] and not reached[t]:
                    reached[t] = True
                    todo.append(t)
    keep = np.flatnonzero(reached)  # state 0 first, when live
    new = np.full(n, len(keep), dtype=np.int64)
    new[keep] = np.arange(len(keep))
    out = np.concatenate([new[table[keep]], np.full((1, 256), len(keep), dtype=np.int64)])
    return out, np.concatenate([accepting[keep], [False]])


def _minimize(table: np.ndarray, accepting: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moore's partition refinement: merge states no input can tell apart. The start stays state 0 and the
    dead state the last."""
    n = len(table)
    dead = n - 1
    columns = np.unique(table.T, axis=0)  # bytes that go alike, once
    reduced = np.ascontiguousarray(columns.T)  # [n, classes]
    labels = accepting.astype(np.int64) + np.where(np.arange(n) == dead, 2, 0)
    count = len(np.unique(labels))
    while True:
        signature = np.ascontiguousarray(np.concatenate([labels[:, None], labels[reduced]], axis=1))
        rows = signature.view(np.dtype((np.void, signature.dtype.itemsize * signature.shape[1]))).ravel()
        _, labels = np.unique(rows, return_inverse=True)
        labels = labels.reshape(-1).astype(np.int64)
        new_count = int(labels.max()) + 1
        if new_count == count:
            break
        count = new_count
    # renumber: the start's block 0, the dead block last, others in order of first appearance
    first = np.full(count, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    blocks_in_order = [int(b) for b in np.argsort(first, kind="stable") if int(b) != int(labels[dead])]
    relabel = np.empty(count, dtype=np.int64)
    relabel[blocks_in_order] = np.arange(len(blocks_in_order))
    relabel[labels[dead]] = len(blocks_in_order)
    blocks = relabel[labels]
    out = np.zeros((count, 256), dtype=np.int32)
    acc = np.zeros(count, dtype=bool)
    out[blocks] = blocks[table]
    acc[blocks] = accepting
    return out, acc
