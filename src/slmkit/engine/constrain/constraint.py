"""Compiled constraints: a regex or JSON schema turned into a DFA once, with token masks per tokenizer, and a
small LRU of them so a repeated schema is compiled once."""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from functools import lru_cache

from ...errors import SlmError
from .automaton import compile_dfa
from .mask import ConstrainedLogits, TokenMasks, vocabulary_of
from .regex import parse_regex
from .schema import json_object_regex, schema_to_regex


class Constraint:
    """What the generated text must match: ``pattern`` (a regex of the ``regex`` subset, whole-text match)
    compiled to a byte DFA. ``processor(tokenizer, eos_ids)`` gives a fresh logits processor for one
    generation; the token masks behind it are kept here, per tokenizer, and shared."""

    def __init__(self, pattern: str, description: str = "regex"):
        self.pattern, self.description = pattern, description
        self.dfa = dfa_of(pattern)
        self._masks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def matches(self, text: str) -> bool:
        """Whether ``text`` satisfies the constraint."""
        return self.dfa.matches(text.encode("utf-8"))

    def max_bytes(self) -> int | None:
        """The longest text the constraint allows, in UTF-8 bytes (None: no limit). A token holds at least one
        byte, so ``max_bytes() + 1`` new tokens always suffice to finish (the +1: end-of-sequence)."""
        return self.dfa.max_length()

    def masks(self, tokenizer, eos_ids) -> TokenMasks:
        key = frozenset(int(i) for i in eos_ids)
        with self._lock:
            per_eos = self._masks.setdefault(tokenizer, {})
            masks = per_eos.get(key)
            if masks is None:
                masks = per_eos[key] = TokenMasks(self.dfa, vocabulary_of(tokenizer), key)
        return masks

    def processor(self, tokenizer, eos_ids) -> ConstrainedLogits:
        """A new logits processor enforcing this constraint (one per generation / per sequence)."""
        return ConstrainedLogits(self.masks(tokenizer, eos_ids))

    def __repr__(self) -> str:
        return f"Constraint({self.description}, {self.dfa.num_states} states)"


@lru_cache(maxsize=32)
def dfa_of(pattern: str):
    """The DFA of a pattern, compiled once for the last few patterns (DFAs are never changed)."""
    return compile_dfa(parse_regex(pattern))


def regex_constraint(pattern: str) -> Constraint:
    """The generated text must match ``pattern`` as a whole (see ``regex`` for the subset)."""
    return Constraint(pattern, "regex")


def json_schema_constraint(schema) -> Constraint:
    """The generated text must be compact JSON valid under ``schema`` (a dict or its JSON text; see ``schema``)."""
    return Constraint(schema_to_regex(schema), "json schema")


def json_object_constraint() -> Constraint:
    """The generated text must be a JSON object (nested a few levels at most)."""
    return Constraint(json_object_regex(), "json object")


def response_format_constraint(response_format) -> Constraint | None:
    """The constraint for an OpenAI ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``
    or ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise SlmError(f"response_format must be an object, got {response_format!r}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_constraint()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise SlmError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return json_schema_constraint(spec["schema"])
    raise SlmError(f"response_format type {kind!r} is not supported (supported: text, json_object, json_schema)")


class ConstraintCache:
    """The last ``size`` constraints built, by what they were built from (a schema's JSON text, a regex)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict[str, Constraint | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, kind: str, spec, build) -> Constraint | None:
        """``build(spec)``, or the constraint built before from an equal ``spec`` of the same ``kind``."""
        try:
            key = kind + ":" + json.dumps(spec, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise SlmError(f"{kind} must be JSON data: {exc}") from None
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        constraint = build(spec)  # outside the lock: compiling may take a while
        with self._lock:
            self._items[key] = constraint
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return constraint

    def regex(self, pattern: str) -> Constraint:
        return self.get("regex", pattern, regex_constraint)

    def json_schema(self, schema) -> Constraint:
        return self.get("json_schema", schema, json_schema_constraint)

    def response_format(self, response_format) -> Constraint | None:
        if response_format is None:  # the common case: nothing to look up
            return None
        return self.get("response_format", response_format, response_format_constraint)
