"""The generation loop: prefill the (left-padded) prompts, then decode one token per step with a KV cache.

Text streams out as it is produced; output that could be the start of a stop string, or that ends in
half a UTF-8 character, is held back until it is settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import ContextLengthError, SlmError
from .kv_cache import KVCache
from .prompt_cache import PromptCache
from .sampling import SamplingParams, make_generator, next_tokens


PREFILL_CHUNK = 256  # prompt tokens per forward pass during prefill


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int


@dataclass
class TextEvent:
    row: int
    delta: str
    done: Completion | None = None  # set on the row's last event


@dataclass
class RowState:
    """One row's progress through generation (shared with engine.batcher)."""

    prompt_len: int
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already streamed
    finished: Completion | None = None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop string or a whole UTF-8 character.

    A trailing U+FFFD (half a character) is held, and so is the start of a stop string just before it:
    once the character is complete it may continue that stop string (stop "中国" over "中" + "\ufffd").
    """
    settled = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(settled)), 0, -1):
            if settled.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold + len(text) - len(settled)


def check_context(prompt_len: int, max_new_tokens: int, context: int) -> None:
    if prompt_len == 0:
        raise SlmError("the prompt is empty (no tokens)")
    if prompt_len + max_new_tokens > context:
        raise ContextLengthError(
            f"prompt has {prompt_len} tokens and max_new_tokens is {max_new_tokens}: together "
            f"{prompt_len + max_new_tokens}, more than the model's context of {context} tokens"
        )


@torch.inference_mode()
def iter_generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams,
                  eos_ids: set[int], prompt_cache: PromptCache | None = None) -> Iterator[TextEvent]:
    """Generate for each prompt; ``prompt_cache`` (optional) supplies the keys/values of the prefix the
    prompts share, so that only the rest of each prompt is run (see engine.prompt_cache)."""
    cfg = model.cfg
    if not prompts:
        return
    for p in prompts:
        check_context(len(p), params.max_new_tokens, cfg.max_position_embeddings)
    rows = [RowState(len(p)) for p in prompts]
    if params.max_new_tokens == 0:
        for i, r in enumerate(rows):
            yield TextEvent(i, "", Completion("", [], "length", r.prompt_len))
        return

    device = model.device
    cache_dtype = getattr(model, "cache_dtype", model.dtype)
    shared = 0 if prompt_cache is None else prompt_cache.prefix_for(
        model, prompts, lambda ids, keep, keys, values: _run_prefix(model, ids, keep, keys, values, cache_dtype))
    suffixes = [p[shared:] for p in prompts]
    b, t = len(prompts), max(len(s) for s in suffixes)
    width = shared + t  # cache slots the prompts fill: the shared prefix, then each row's own (left-padded) part
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if pad is not None else (cfg.pad_token_id or 0)
    ids = torch.full((b, t), pad, dtype=torch.long)
    key_valid = torch.zeros((b, width + params.max_new_tokens), dtype=torch.bool)
    key_valid[:, :shared] = True
    seen = torch.empty((b, width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, suffixes)):
        ids[i, t - len(s):] = torch.tensor(s)
        key_valid[i, width - len(s):width] = True
        seen[i] = torch.tensor([p[0]] * (width - len(p)) + p)  # padding repeats a real token: no extra penalty
    padded = any(len(s) != t for s in suffixes)
    positions = (key_valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)[:, shared:]
    ids, key_valid, positions, seen = ids.to(device), key_valid.to(device), positions.to(device), seen.to(device)

    generator = make_generator(params, device)
    cache = KVCache(cfg, b, width + params.max_new_tokens, cache_dtype, device)
    if shared:
        cache.load_prefix(prompt_cache.keys, prompt_cache.values)
    logits = prefill(model, ids, positions, key_valid if padded else None, cache, start=shared)
    next_pos = positions[:, -1] + 1
    penalize = params.repetition_penalty != 1.0
    processors = bool(params.logits_processors)

    for step in range(params.max_new_tokens):
        # each row's ids so far, unpadded: a finished row's stops growing (what is chosen for it is dropped)
        context = [[*p, *row.ids] for p, row in zip(prompts, rows)] if processors else None
        tokens = next_tokens(logits, params, seen, generator, context)
        last_step = step == params.max_new_tokens - 1
        for i, row in enumerate(rows):
            if row.finished is None:
                yield from advance_row(i, row, int(tokens[i]), tokenizer, params.stop, eos_ids, last_step)
        if all(r.finished is not None for r in rows) or last_step:
            return
        slot = width + step
        key_valid[:, slot] = True
        if penalize:
            seen = torch.cat((seen, tokens[:, None]), dim=1)
        logits = model(tokens[:, None], next_pos[:, None], key_valid[:, :slot + 1] if padded else None, cache,
                       slot, last_only=True)[:, -1]
        next_pos = next_pos + 1


def prefill(model, ids, positions, key_valid, cache, chunk: int = PREFILL_CHUNK, start: int = 0) -> torch.Tensor:
    """Run the prompts (``ids`` fill cache slots from ``start``) through the model ``chunk`` tokens at a time
    (bounded activation memory); return the last position's logits [B, V]."""
    t = ids.shape[1]
    for lo in range(0, t, chunk):
        hi = min(lo + chunk, t)
        kv = None if key_valid is None else key_valid[:, :start + hi]
        logits = model(ids[:, lo:hi], positions[:, lo:hi], kv, cache, start + lo, last_only=True)
    return logits[:, -1]


def _run_prefix(model, ids: list[int], keep: int, keys, values, dtype):
    """Keys/values [1, H, len(ids), D] per layer of the prefix ``ids``, the first ``keep`` taken as given."""
    cache = KVCache(model.cfg, 1, len(ids), dtype, model.device)
    if keep:
        cache.load_prefix(keys, values)
    rest = torch.tensor([ids[keep:]], device=model.device)
    positions = torch.arange(keep, len(ids), device=model.device)[None]
    prefill(model, rest, positions, None, cache, start=keep)
    return cache.keys, cache.values


def _text(tokenizer, ids: list[int]) -> str:
    return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)


def advance_row(i: int, row: RowState, token: int, tokenizer, stops: list[str], eos_ids: set[int],
                last_step: bool):
    """Take one new token for a row; yield the text it settles (``tokenizer=None``: token ids only)."""
    if token in eos_ids:
        text = _text(tokenizer, row.ids)
        row.finished = Completion(text, row.ids, "stop", row.prompt_len)
        yield TextEvent(i, text[row.emitted:], row.finished)
        return
    row.ids.append(token)
    text = _text(tokenizer, row.ids)
    hits = [text.find(s) for s in stops if s and s in text]
    if hits:
        text = text[:min(hits)]
        row.finished = Completion(text, row.ids, "stop", row.prompt_len)
    elif last_step:
        row.finished = Completion(text, row.ids, "length", row.prompt_len)
    if row.finished is not None:
        yield TextEvent(i, text[row.emitted:], row.finished)
        return
    safe = len(text) - _held_back(text, stops)
    if safe > row.emitted:
        yield TextEvent(i, text[row.emitted:safe])
        row.emitted = safe


def generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams, eos_ids: set[int],
             on_text=None, prompt_cache: PromptCache | None = None) -> list[Completion]:
    """Run :func:`iter_generate` to the end; ``on_text(row, delta)`` sees the stream."""
    done: list[Completion | None] = [None] * len(prompts)
    for ev in iter_generate(model, tokenizer, prompts, params, eos_ids, prompt_cache):
        if on_text is not None and ev.delta:
            on_text(ev.row, ev.delta)
        if ev.done is not None:
            done[ev.row] = ev.done
    return done  # type: ignore[return-value]
