"""Continuous batching gives each sequence exactly what it would get decoded alone."""

import threading
import time

import pytest
import torch

from slmkit.engine.batcher import Batcher, QueueFull, Sequence
from slmkit.engine.generate import generate
from slmkit.engine.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

from test_parity_decoder import hf_model_and_ours  # noqa: E402


class Collect:
    def __init__(self, expected: int):
        self.done, self.tokens, self.expected = {}, {}, expected
        self.all_done = threading.Event()

    def sink(self, key):
        def on_event(ev):
            assert ev.error is None, ev.error
            if ev.token is not None:
                self.tokens.setdefault(key, []).append(ev.token)
            if ev.done is not None:
                self.done[key] = ev.done
                if len(self.done) == self.expected:
                    self.all_done.set()
        return on_event


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3"])  # gemma3: sliding window of 4 slots
def test_staggered_sequences_match_decoding_alone(tmp_path, name):
    _, model = hf_model_and_ours(name, tmp_path)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (5, 11, 3, 8, 2)]
    params = SamplingParams(max_new_tokens=9)
    want = [generate(model, None, [p], params, eos_ids=set())[0].token_ids for p in prompts]
    got = Collect(len(prompts))
    batcher = Batcher(model, None, set(), max_batch=3)  # the 4th and 5th wait for a free row
    batcher.start()
    try:
        for i, p in enumerate(prompts):
            batcher.submit(Sequence(p, params, got.sink(i)))
            time.sleep(0.01 * i)  # join while others are mid-way
        assert got.all_done.wait(60)
    finally:
        batcher.stop()
    assert [got.done[i].token_ids for i in range(len(prompts))] == want
    assert batcher.active == 0 and batcher.cache.capacity == 0  # rows and cache released


def test_a_cancelled_sequence_leaves_and_the_others_go_on(tmp_path):
    _, model = hf_model_and_ours("llama-gqa", tmp_path)
    long = SamplingParams(max_new_tokens=60)
    want = generate(model, None, [[3, 4, 5]], long, eos_ids=set())[0].token_ids
    got = Collect(1)
    batcher = Batcher(model, None, set(), max_batch=2)
    doomed = Sequence([7, 8, 9, 10], long, lambda ev: doomed.cancel() if ev.token is not None else None)
    batcher.start()
    try:
        batcher.submit(doomed)  # cancels itself after its first token
        batcher.submit(Sequence([3, 4, 5], long, got.sink(0)))
        assert got.all_done.wait(60)
    finally:
        batcher.stop()
    assert got.done[0].token_ids == want


def test_queue_limit(tmp_path):
    _, model = hf_model_and_ours("llama-gqa", tmp_path)
    batcher = Batcher(model, None, set(), max_batch=1, max_queue=1)  # not started: nothing is admitted
    params = SamplingParams(max_new_tokens=4)
    batcher.submit(Sequence([1, 2], params, lambda ev: None))  # a free row
    batcher.submit(Sequence([1, 2], params, lambda ev: None))  # the one queue place
    with pytest.raises(QueueFull):
        batcher.submit(Sequence([1, 2], params, lambda ev: None))
