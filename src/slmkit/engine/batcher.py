"""Continuous batching: sequences join and leave a running batch between decode steps.

Each running sequence owns one row of a shared KV cache and its own length. A new sequence is prefilled
alone into a free row, then decodes together with the others: one forward pass per step for every
row, each writing its key/value at its own position and attending to its own slots only. A finished
or cancelled sequence leaves at once; the last row moves into its place so the running rows stay
contiguous, and the cache is released when nothing runs.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SlmError
from .generate import Completion, RowState, advance_row, check_context, prefill
from .sampling import SamplingParams, make_generator, next_tokens

GROW = 256  # cache length is allocated in multiples of this many slots


class QueueFull(SlmError):
    """Too many sequences are waiting; the caller should retry later."""


@dataclass
class Event:
    """What a sequence produced in one step: new text, the token (with log-probabilities when asked
    for) and, on its last event, the finished completion."""
    delta: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    done: Completion | None = None
    error: str | None = None


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]  # called from the engine thread
    logprobs: int | None = None  # top log-probabilities to return per generated token
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    state: RowState | None = None
    generator: torch.Generator | None = None
    length: int = 0  # tokens stored in this sequence's cache row

    def cancel(self) -> None:
        self.cancelled = True


class _RowCache:
    """Keys/values [rows, kv_heads, capacity, head_dim] per layer; row ``r`` belongs to one sequence."""

    def __init__(self, cfg, rows: int, dtype, device):
        self.cfg, self.rows, self.dtype, self.device = cfg, rows, dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0

    def ensure(self, needed: int, live: int) -> None:
        if needed <= self.capacity:
            return
        cap = -(-needed // GROW) * GROW
        shape = (self.rows, self.cfg.n_kv_heads, cap, self.cfg.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.cfg.n_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.cfg.n_layers)]
        for old, new in zip(self.keys + self.values, keys + values):
            new[:live, :, :self.capacity] = old[:live]
        self.keys, self.values, self.capacity = keys, values, cap

    def release(self) -> None:
        self.keys, self.values, self.capacity = [], [], 0

    def move_row(self, src: int, dst: int) -> None:
        for t in self.keys + self.values:
            t[dst] = t[src]


class _OneRow:
    """The cache as seen by a prefill of one sequence into row ``r`` (slots from 0)."""

    def __init__(self, cache: _RowCache, r: int):
        self.cache, self.r = cache, r

    def update(self, layer: int, k, v, start: int):
        end = start + k.shape[2]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.r:self.r + 1, :, start:end] = k
        values[self.r:self.r + 1, :, start:end] = v
        return keys[self.r:self.r + 1, :, :end], values[self.r:self.r + 1, :, :end]


class _Running:
    """The cache as seen by a decode step of rows ``0..n-1``: each writes at its own length."""

    def __init__(self, cache: _RowCache, lengths: torch.Tensor, span: int):
        self.cache, self.lengths, self.span = cache, lengths, span
        self.rows = torch.arange(len(lengths), device=lengths.device)

    def update(self, layer: int, k, v, start: int):
        n = len(self.lengths)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.lengths] = k[:, :, 0].to(keys.dtype)
        values[self.rows, :, self.lengths] = v[:, :, 0].to(values.dtype)
        return keys[:n, :, :self.span], values[:n, :, :self.span]

    def decode_slots(self, start: int, batch: int):
        """For models.fused_decode: (keys, values per layer, each row's slot, span)."""
        return self.cache.keys, self.cache.values, self.lengths, self.span


class Batcher:
    """Runs sequences on one model, ``max_batch`` at a time: ``run()`` in the calling thread until ``stop()``,
    or ``start()`` for a background thread.

    Prefer ``run()`` on the thread that loaded the model (``slmkit.serve.serve`` does). OpenMP keeps one pool
    of worker threads per thread that has run parallel work; once a second thread starts one, libgomp counts
    more busy-waiting threads than cores and its workers sleep between parallel regions instead of spinning,
    so every one of a decode step's ~200 regions pays a futex wake-up: 15-25 % of single-stream decode on
    2 cores (measured with the sequence's voluntary context switches: 0 on the loading thread, ~200 a
    token on a new one).
    """

    def __init__(self, model, tokenizer, eos_ids: set[int], max_batch: int = 32, max_queue: int = 256):
        if max_batch < 1 or max_queue < 0:
            raise SlmError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = _RowCache(model.cfg, max_batch, getattr(model, "cache_dtype", model.dtype), model.device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.jobs: deque[tuple[Callable, Callable]] = deque()  # other model work (scoring), run between steps
        self.lock = threading.Condition()
        self.stopped = False
        self.held = False  # hold(): nothing starts while set
        self.thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------ interface
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="slmkit-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join()

    def submit(self, seq: Sequence) -> None:
        check_context(len(seq.prompt), seq.params.max_new_tokens, self.model.cfg.max_position_embeddings)
        with self.lock:
            free_rows = max(0, self.max_batch - len(self.running))
            if len(self.waiting) >= self.max_queue + free_rows:
                raise QueueFull(f"the queue is full ({len(self.waiting)} waiting)")
            self.waiting.append(seq)
            self.lock.notify_all()

    @contextlib.contextmanager
    def hold(self):
        """Start nothing new inside this block: submitted sequences and jobs wait, running ones finish their
        current step and then wait too (tests fill the queue this way instead of racing the engine)."""
        with self.lock:
            self.held = True
        try:
            yield self
        finally:
            with self.lock:
                self.held = False
                self.lock.notify_all()

    def run_job(self, fn: Callable, done: Callable) -> None:
        """Run ``fn()`` on the engine thread between decode steps; ``done(result_or_exception)`` after."""
        with self.lock:
            self.jobs.append((fn, done))
            self.lock.notify_all()

    @property
    def active(self) -> int:
        return len(self.running)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # ----------------------------------------------------------------- loop
    @torch.inference_mode()  # the cache is an inference tensor: every update happens in this mode
    def run(self) -> None:
        """Serve submitted sequences and jobs in this thread until ``stop()``."""
        while True:
            with self.lock:
                while not self.stopped and (self.held or not (self.waiting or self.running or self.jobs)):
                    self.lock.wait()
                if self.stopped:
                    return
                jobs = list(self.jobs)
                self.jobs.clear()
                joining = []
                while self.waiting and len(self.running) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            for fn, done in jobs:
                try:
                    result = fn()
                except Exception as e:  # handed to the caller, who reports it
                    result = e
                done(result)
            try:
                for seq in joining:
                    self._join(seq)
                self._drop_finished()
                if self.running:
                    self._step()
                    self._drop_finished()
            except Exception as e:  # a bug must not hang every client: fail the running sequences
                for seq in self.running:
                    seq.sink(Event(error=f"generation failed: {e!r}"))
                self.running = []
            if not self.running:
                self.cache.release()

    def _join(self, seq: Sequence) -> None:
        if seq.cancelled:
            return
        if seq.params.max_new_tokens == 0:
            seq.sink(Event(done=Completion("", [], "length", len(seq.prompt))))
            return
        r = len(self.running)
        n = len(seq.prompt)
        self.cache.ensure(n + 1, r)  # grown as the sequences get longer, not reserved up front
        ids = torch.tensor([seq.prompt], device=self.model.device)
        positions = torch.arange(n, device=ids.device)[None]
        logits = prefill(self.model, ids, positions, None, _OneRow(self.cache, r))
        seq.length = n
        seq.state = RowState(n)
        seq.generator = make_generator(seq.params, self.model.device)
        self.running.append(seq)
        self._take(seq, logits[0])

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Choose the sequence's next token from its logits [V] and report what it settles."""
        p = seq.params
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.tensor([seq.prompt + seq.state.ids], device=logits.device)
        context = [seq.prompt + seq.state.ids] if p.logits_processors else None  # its own, a batch of one
        token = int(next_tokens(logits[None], p, seen, seq.generator, context)[0])
        logprob = top = None
        if seq.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            logprob = float(lp[token])
            if seq.logprobs > 0:
                values, ids = lp.topk(seq.logprobs)
                top = {int(i): float(v) for i, v in zip(ids, values)}
        last = len(seq.state.ids) + 1 >= p.max_new_tokens
        produced = False
        eos = set() if seq.ignore_eos else self.eos_ids
        for ev in advance_row(0, seq.state, token, self.tokenizer, p.stop, eos, last):
            produced = True
            seq.sink(Event(ev.delta, token, logprob, top, ev.done))
        if not produced:  # text held back (a possible stop string or half a character): still a token
            seq.sink(Event("", token, logprob, top))

    def _step(self) -> None:
        n = len(self.running)
        tokens = torch.tensor([[s.state.ids[-1]] for s in self.running], device=self.model.device)
        lengths = torch.tensor([s.length for s in self.running], device=self.model.device)
        span = int(lengths.max()) + 1
        self.cache.ensure(span, n)
        slots = torch.arange(span, device=lengths.device)
        visible = (slots[None, :] <= lengths[:, None])[:, None, :]  # [n, 1, span]: own tokens + the new one
        logits = self.model(tokens, lengths[:, None], None, _Running(self.cache, lengths, span), 0,
                            last_only=True, attn_mask=visible)[:, -1]
        self.steps += 1
        for i, seq in enumerate(self.running):
            seq.length += 1
            if seq.state.finished is None and not seq.cancelled:
                self._take(seq, logits[i])

    def _drop_finished(self) -> None:
        keep = []
        for seq in self.running:
            if seq.cancelled or seq.state.finished is not None:
                continue
            keep.append(seq)
        if len(keep) == len(self.running):
            return
        for dst, seq in enumerate(keep):  # compact: row i holds keep[i]
            src = self.running.index(seq)
            if src != dst:
                self.cache.move_row(src, dst)
        self.running = keep
