"""Chat SFT data: instruction files read into conversations, tokenized with loss on assistant text only.

Reading (``load_conversations``): one JSON list or a JSON Lines file; each record's format is detected
on its own —

* Alpaca ``{instruction, input, output}``: user = instruction (+ ``"\\n\\n" + input`` when input is
  non-empty), assistant = output; LIMA / LLaMA-Factory add ``history: [[user, assistant], ...]``
  (earlier turns, placed first) and may carry a ``system`` string;
* ShareGPT ``{conversations: [{from: human|gpt|system, value}]}``;
* ``{messages: [{role, content}]}``.

Tokenizing (``tokenize_conversation``): the tokenizer's own chat template renders the conversation;
each assistant turn's character span is found by rendering prefixes — ``messages[:i]`` with the
generation prompt ends where the turn's text starts, ``messages[:i+1]`` minus trailing whitespace ends
where it stops (after the template's end-of-turn marker, before the newline that follows it). The full
text is tokenized once with offsets, and a token is a label when it starts inside an assistant span.
Labels are aligned with ``input_ids`` (-100 elsewhere); the loss shifts them, as in transformers.

``ChatDataset`` serves the tokenized examples in a per-epoch permutation and pads batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SlmError
from .common import json_records
from .epochs import EpochOrder

IGNORE = -100
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_ROLES = {"system", "user", "assistant"}


# ---- reading --------------------------------------------------------------------------------
def load_conversations(path: str | Path, *, system: str | None = None) -> list[list[dict]]:
    """Every record of an instruction file as a list of ``{"role", "content"}`` messages.

    ``system`` is prepended to each conversation that has no system message of its own.
    """
    path = Path(path)
    conversations = []
    for index, line, record in json_records(path, "instruction records"):
        where = "" if line is None else f" (line {line})"
        try:
            messages = _to_messages(record)
        except SlmError as exc:
            raise SlmError(f"{path}: record {index}{where}: {exc}") from None
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        conversations.append(messages)
    if not conversations:
        raise SlmError(f"{path}: no records")
    return conversations


def _to_messages(record: Any) -> list[dict]:
    if not isinstance(record, dict):
        raise SlmError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        messages = _messages_form(record["messages"])
    elif "conversations" in record:
        messages = _sharegpt_form(record["conversations"])
    elif "instruction" in record:
        messages = _alpaca_form(record)
    else:
        raise SlmError(f"unknown format (keys {sorted(record)}); expected 'instruction'/'output' (Alpaca), "
                       "'conversations' (ShareGPT) or 'messages'")
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles:
        raise SlmError("no user or assistant message")
    if roles[0] != "user":
        raise SlmError(f"the conversation must start with a user message, not {roles[0]!r}")
    return messages


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SlmError(f"{what} must be a string, found {type(value).__name__}")
    return value


def _alpaca_form(record: dict) -> list[dict]:
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], "'system'")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise SlmError(f"'history' must be a list of [user, assistant] pairs, found {type(history).__name__}")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise SlmError(f"history[{turn}] must be a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{turn}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{turn}][1]")})
    user = _text(record["instruction"], "'instruction'")
    extra = _text(record.get("input") or "", "'input'")
    if extra:
        user = f"{user}\n\n{extra}"
    if "output" not in record:
        raise SlmError("Alpaca record has no 'output'")
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _text(record["output"], "'output'")})
    return messages


def _sharegpt_form(turns: Any) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise SlmError("'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    for turn, item in enumerate(turns):
        if not isinstance(item, dict) or "from" not in item or "value" not in item:
            raise SlmError(f"conversations[{turn}] must be an object with 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(item["from"])
        if role is None:
            raise SlmError(f"conversations[{turn}]: unknown speaker {item['from']!r} "
                           f"(known: {', '.join(sorted(_SHAREGPT_ROLES))})")
        messages.append({"role": role, "content": _text(item["value"], f"conversations[{turn}].value")})
    return messages


def _messages_form(items: Any) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise SlmError("'messages' must be a non-empty list of {role, content} messages")
    messages = []
    for turn, item in enumerate(items):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise SlmError(f"messages[{turn}] must be an object with 'role' and 'content'")
        if item["role"] not in _ROLES:
            raise SlmError(f"messages[{turn}]: unknown role {item['role']!r} (known: {', '.join(sorted(_ROLES))})")
        messages.append({"role": item["role"], "content": _text(item["content"], f"messages[{turn}].content")})
    return messages


# ---- tokenizing -----------------------------------------------------------------------------
def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        for part, name in ((prompt, f"the first {i} messages plus the generation prompt"),
                           (upto, f"the first {i + 1} messages")):
            if not full.startswith(part):
                at = next(k for k, (a, b) in enumerate(zip(part + "\0", full + "\0")) if a != b)
                raise SlmError(
                    f"the chat template is not prefix-stable: rendering {name} is not a prefix of the whole "
                    f"conversation (they differ at character {at}: {part[at:at + 40]!r} vs "
                    f"{full[at:at + 40]!r}), so assistant turn {i} cannot be located for loss masking")
        end = len(upto.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> dict[str, list[int]]:
    """``input_ids`` of the rendered conversation and ``labels`` = the id on assistant tokens, else -100.

    Assistant tokens are the turn's content and the template's end-of-turn marker. The BOS is added
    when the tokenizer adds one and the template did not; the result keeps the first ``max_len`` tokens.
    """
    if max_len < 1:
        raise SlmError(f"max_len must be >= 1, got {max_len}")
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, labels = [], []
    for token_id, (start, _) in zip(encoding.ids, encoding.offsets):
        ids.append(token_id)
        labels.append(token_id if any(a <= start < b for a, b in spans) else IGNORE)
    bos = tokenizer.bos_id
    if tokenizer.add_bos and bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
        labels.insert(0, IGNORE)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


# ---- serving --------------------------------------------------------------------------------
class ChatDataset:
    """Tokenized conversations, drawn in a fresh permutation each epoch and padded into batches."""

    def __init__(self, examples: list[dict[str, list[int]]], *, dropped: int = 0):
        self.examples = list(examples)
        self.dropped = dropped  # conversations left out: no assistant token within max_len
        self.order = EpochOrder(len(self.examples))

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, k: int, seed: int) -> dict[str, list[int]]:
        """The k-th draw: epoch k // len, in that epoch's permutation from ``default_rng([seed, epoch])``."""
        if not self.examples:
            raise SlmError("the chat dataset is empty")
        return self.examples[self.order(k, seed)]

    @staticmethod
    def collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sample: ``input_ids`` with ``pad_id``, ``labels`` with -100."""
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), int(pad_id), dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.tensor(sample["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(sample["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels}


def build_chat_dataset(path: str | Path, tokenizer, max_len: int, val_fraction: float = 0.05, seed: int = 0,
                       *, system: str | None = None) -> tuple[ChatDataset, ChatDataset]:
    """Read, split (deterministically by ``seed``) and tokenize an instruction file.

    Conversations with no assistant token left after truncation are dropped; each dataset's
    ``dropped`` says how many.
    """
    if not 0 <= val_fraction < 1:
        raise SlmError(f"val_fraction must be in [0, 1), got {val_fraction}")
    conversations = load_conversations(path, system=system)
    order = np.random.default_rng(seed).permutation(len(conversations))
    n_val = round(len(conversations) * val_fraction)
    if val_fraction > 0 and len(conversations) > 1:
        n_val = max(n_val, 1)
    splits = []
    for indices in (order[n_val:], order[:n_val]):
        kept, dropped = [], 0
        for index in sorted(int(i) for i in indices):
            example = tokenize_conversation(tokenizer, conversations[index], max_len)
            if any(label != IGNORE for label in example["labels"]):
                kept.append(example)
            else:
                dropped += 1
        splits.append(ChatDataset(kept, dropped=dropped))
    if not splits[0].examples:
        raise SlmError(f"{path}: no training conversation keeps an assistant token within max_len={max_len}")
    return splits[0], splits[1]
