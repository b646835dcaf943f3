"""Logits processors: callables (logits [B, V], context) -> logits that run before the sampling steps, in
plain generation, left-padded batches, the API and the continuous batcher.

The unit tests use random logits; the rest the real SmolLM2-135M-Instruct GGUF (float), at most 8 new tokens.
"""

import threading

import pytest
import torch

import slmkit
from slmkit.engine.batcher import Batcher, Sequence
from slmkit.engine.generate import generate
from slmkit.engine.sampling import (AllowedTokens, BannedTokens, RepetitionPenalty, SamplingParams,
                                    apply_logits_processors, apply_repetition_penalty, next_tokens)
from slmkit.errors import SlmError

STORY = "Once upon a time"
FRANCE = "The capital of France is"
DRAGON = "Write a long story about a dragon who lives in a cave:"


def identity(logits, context):
    return logits


class Recorder:
    """Keeps a copy of what it is called with and changes nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, logits, context):
        assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[0] == len(context)
        self.calls.append([list(c) for c in context])
        return logits


# --------------------------------------------------------------------------------- without a checkpoint
def random_logits(seed: int, rows: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_banned_and_allowed_tokens_mask_to_minus_inf():
    logits = random_logits(0)
    banned = BannedTokens([3, 7, 7])
    out = banned(logits.clone(), [[1]] * 3)
    assert torch.isneginf(out[:, [3, 7]]).all()
    keep = [i for i in range(50) if i not in (3, 7)]
    assert torch.equal(out[:, keep], logits[:, keep])
    allowed = AllowedTokens(torch.tensor([5, 9]))
    out = allowed(logits.clone(), [[1]] * 3)
    assert torch.equal(out[:, [5, 9]], logits[:, [5, 9]])
    assert torch.isneginf(out).sum() == 3 * 48
    p = SamplingParams(logits_processors=[allowed])
    assert set(next_tokens(logits, p, None, None, [[1]] * 3).tolist()) <= {5, 9}
    p = SamplingParams(temperature=1.0, logits_processors=[allowed])
    row = logits[:1].clone()
    row[0, [5, 9]] = -1.0  # equally likely, and less likely than many of the masked tokens
    draws = next_tokens(row.expand(200, -1), p, None, torch.Generator().manual_seed(0), [[1]] * 200)
    assert set(draws.tolist()) == {5, 9}
    assert "BannedTokens([3, 7])" == repr(banned)


def test_processors_run_in_order_before_the_sampling_steps_and_leave_the_input_alone():
    logits = random_logits(1)
    before = logits.clone()
    order = []

    def first(x, ctx):
        order.append("first")
        x[:, 0] = 100.0  # in place is allowed: it is the processors' own copy
        return x

    def second(x, ctx):
        order.append("second")
        return x.index_fill(-1, torch.tensor([0]), float("-inf")) + 0.0

    p = SamplingParams(logits_processors=(first, second))
    got = next_tokens(logits, p, None, None, [[1]] * 3)
    assert order == ["first", "second"]
    assert torch.equal(logits, before)
    assert torch.equal(got, before[:, 1:].argmax(-1) + 1)
    # the built-in steps come after: top-k=1 on the processed logits
    p = SamplingParams(temperature=1.0, top_k=1, logits_processors=[BannedTokens(before.argmax(-1).tolist())])
    got = next_tokens(logits, p, None, torch.Generator().manual_seed(0), [[1]] * 3)
    masked = before.clone()
    masked[:, before.argmax(-1)] = float("-inf")
    assert torch.equal(got, masked.argmax(-1))


def test_repetition_penalty_as_a_processor_equals_the_built_in():
    logits = random_logits(2)
    context = [[4, 4, 9, 1], [2], [7, 30, 31, 32, 33, 7]]  # ragged, as a processor sees them
    seen = torch.tensor([c + [c[0]] * (6 - len(c)) for c in context])  # how the engine pads its history
    for kw in (dict(), dict(temperature=0.7, top_k=5)):
        builtin = SamplingParams(repetition_penalty=1.7, **kw)
        as_proc = SamplingParams(logits_processors=[RepetitionPenalty(1.7)], **kw)
        gen = lambda: torch.Generator().manual_seed(3) if kw else None  # noqa: E731
        assert torch.equal(next_tokens(logits, builtin, seen, gen(), context),
                           next_tokens(logits, as_proc, None, gen(), context))
    out = apply_logits_processors(logits, [RepetitionPenalty(1.7)], context)
    assert torch.equal(out, apply_repetition_penalty(logits, seen, 1.7))


def test_bad_processors_are_named_errors():
    for bad, match in (([1], r"logits_processors\[0\] is not callable"),
                       ([identity, "ban"], r"logits_processors\[1\] is not callable"),
                       ("ban", "must be a list of callables"), (3, "must be a list of callables")):
        with pytest.raises(SlmError, match=match):
            SamplingParams(logits_processors=bad)
    assert SamplingParams(logits_processors=[]).logits_processors == ()
    assert SamplingParams(logits_processors=None).logits_processors == ()
    assert SamplingParams(logits_processors=identity).logits_processors == (identity,)  # one callable
    logits = random_logits(3)
    with pytest.raises(SlmError, match="returned None"):
        next_tokens(logits, SamplingParams(logits_processors=[lambda x, c: None]), None, None, [[1]] * 3)
    with pytest.raises(SlmError, match=r"shape \(3, 50\)"):
        next_tokens(logits, SamplingParams(logits_processors=[lambda x, c: x[:, :5]]), None, None, [[1]] * 3)
    with pytest.raises(SlmError, match="no token to choose in row 0"):
        next_tokens(logits, SamplingParams(logits_processors=[BannedTokens(range(50))]), None, None, [[1]] * 3)
    with pytest.raises(SlmError, match="context"):
        next_tokens(logits, SamplingParams(logits_processors=[identity]), None, None)
    with pytest.raises(SlmError, match="outside the vocabulary"):
        BannedTokens([50])(logits, [[1]] * 3)
    for bad in ([-1], ["a"], [1.5], 2.5):
        with pytest.raises(SlmError, match="BannedTokens"):
            BannedTokens(bad)
    with pytest.raises(SlmError, match="at least one"):
        AllowedTokens([])
    with pytest.raises(SlmError, match="RepetitionPenalty"):
        RepetitionPenalty(0)


# ------------------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return slmkit.load(smollm2_gguf, quant="none")


def ranked(lm, ids: list[int], k: int = 2) -> list[int]:
    return lm.logits(ids)[0, -1].topk(k).indices.tolist()


def test_banning_the_greedy_token_gives_the_second_ranked(lm):
    ids = lm.tokenizer.encode(FRANCE)
    first, second = ranked(lm, ids)
    assert first not in lm.eos_ids and second not in lm.eos_ids
    assert lm.complete([FRANCE], max_new_tokens=1)[0].token_ids == [first]
    got = lm.complete([FRANCE], max_new_tokens=1, logits_processors=[BannedTokens([first])])[0]
    assert got.token_ids == [second]
    # the other entry points pass the processors through too
    text = lm.generate(FRANCE, max_new_tokens=4, logits_processors=[BannedTokens([first])])
    assert text.startswith(lm.tokenizer.decode([second]))
    assert "".join(lm.stream(FRANCE, max_new_tokens=4, logits_processors=[BannedTokens([first])])) == text
    chat_ids = lm.prompt_ids(FRANCE, chat=True)
    chat_first = ranked(lm, chat_ids, 1)[0]
    messages = [{"role": "user", "content": FRANCE}]
    reply = lm.chat(messages, max_new_tokens=2, logits_processors=[AllowedTokens([chat_first])])
    assert reply == lm.tokenizer.decode([chat_first] * 2, skip_special_tokens=True)


def test_context_is_prompt_plus_generated_for_a_left_padded_batch(lm):
    prompts = [STORY, DRAGON]
    ids = [lm.tokenizer.encode(p) for p in prompts]
    assert len(ids[0]) != len(ids[1])  # the shorter row is left-padded
    rec = Recorder()
    n = 6
    got = lm.complete(prompts, max_new_tokens=n, logits_processors=[rec])
    assert [len(c.token_ids) for c in got] == [n, n]
    assert len(rec.calls) == n  # one call per step (no row ends early on these prompts)
    for step, context in enumerate(rec.calls):
        for row in range(2):
            generated = got[row].token_ids
            assert context[row] == ids[row] + generated[:step], (step, row)


def test_other_models_log_probs_as_a_bias(lm):
    """Emulated fine-tuning adds (log-probs of one model - log-probs of another) to the logits. Here the
    'other model' is the same float model scoring each row's context from scratch: its log-probs must equal
    those of the logits the processor gets, and adding them changes no greedy choice."""
    seen_rows = []

    def add_other_logprobs(logits, context):
        other = torch.stack([lm.logits(c)[0, -1].log_softmax(-1) for c in context])
        torch.testing.assert_close(other, logits.log_softmax(-1), atol=2e-3, rtol=0)
        seen_rows.append(len(context))
        return logits + other

    prompts = [STORY, FRANCE]
    plain = lm.complete(prompts, max_new_tokens=3)
    mixed = lm.complete(prompts, max_new_tokens=3, logits_processors=[add_other_logprobs])
    assert [c.token_ids for c in mixed] == [c.token_ids for c in plain]
    assert seen_rows == [2] * 3

    # a fixed bias tensor decides every step
    target = ranked(lm, lm.tokenizer.encode(STORY), 5)[4]
    bias = torch.zeros(lm.config.vocab_size)
    bias[target] = 1e4
    got = lm.complete([STORY], max_new_tokens=3, logits_processors=[lambda x, c: x + bias])[0]
    assert got.token_ids == [target] * 3


def test_no_processors_changes_nothing(lm):
    prompts = [STORY, DRAGON]
    want = [c.token_ids for c in lm.complete(prompts, max_new_tokens=6)]
    for procs in ([], [identity]):
        assert [c.token_ids for c in lm.complete(prompts, max_new_tokens=6, logits_processors=procs)] == want
    kw = dict(max_new_tokens=6, temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.3)
    assert lm.generate(STORY, logits_processors=[identity], **kw) == lm.generate(STORY, **kw)


def test_non_callable_through_the_api(lm):
    with pytest.raises(SlmError, match=r"logits_processors\[0\] is not callable"):
        lm.generate(STORY, max_new_tokens=2, logits_processors=[{1: -1}])
    with pytest.raises(SlmError, match="not callable"):
        list(lm.stream(STORY, max_new_tokens=2, logits_processors=[None]))


def test_the_batcher_applies_each_sequences_processors(lm):
    model = lm.model
    prompts = [lm.tokenizer.encode(p) for p in (FRANCE, STORY, DRAGON)]
    banned_first = ranked(lm, prompts[0])[0]
    rec = Recorder()
    params = [SamplingParams(max_new_tokens=4, logits_processors=[BannedTokens([banned_first])]),
              SamplingParams(max_new_tokens=4, logits_processors=[rec]),
              SamplingParams(max_new_tokens=4)]
    want = [generate(model, None, [p], sp, eos_ids=set())[0].token_ids for p, sp in zip(prompts, params)]
    assert want[0][0] == ranked(lm, prompts[0])[1]
    rec.calls.clear()

    done, all_done = {}, threading.Event()

    def sink(key):
        def on_event(ev):
            assert ev.error is None, ev.error
            if ev.done is not None:
                done[key] = ev.done
                if len(done) == len(prompts):
                    all_done.set()
        return on_event

    batcher = Batcher(model, None, set(), max_batch=3)
    batcher.start()
    try:
        with batcher.hold():  # all three join the same running batch
            for i, (p, sp) in enumerate(zip(prompts, params)):
                batcher.submit(Sequence(p, sp, sink(i)))
        assert all_done.wait(120)
    finally:
        batcher.stop()
    assert [done[i].token_ids for i in range(3)] == want
    # the recorder saw its own sequence only, one row at a time, with the ids so far
    assert [len(c) for c in rec.calls] == [1] * 4
    assert [c[0] for c in rec.calls] == [prompts[1] + want[1][:k] for k in range(4)]
