"""Packed scoring (a question's choices after one shared context) equals scoring each choice on its own."""

import pytest
import torch

from slmkit.eval.scoring import Group, rolling_windows, score_groups

transformers = pytest.importorskip("transformers")

from test_parity_decoder import hf_model_and_ours  # noqa: E402


def reference_scores(hf, context, continuation):
    """lm-evaluation-harness's way: one sequence context + continuation, the continuation's log-probs."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0].float(), -1)
    n = len(context)
    picked = [logprobs[n - 1 + j, tok] for j, tok in enumerate(continuation)]
    greedy = all(int(logprobs[n - 1 + j].argmax()) == tok for j, tok in enumerate(continuation))
    return float(sum(picked)), greedy


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3"])  # gemma3: sliding-window layers (window 4)
def test_packed_choices_equal_separate_sequences(tmp_path, name):
    hf, ours = hf_model_and_ours(name, tmp_path)
    gen = torch.Generator().manual_seed(3)

    def rand(n):
        return torch.randint(1, 97, (n,), generator=gen).tolist()

    groups = [Group(rand(9), [rand(3), rand(1), rand(5), rand(2)]),
              Group(rand(2), [rand(4)]),
              Group(rand(14), [rand(1), rand(6)])]
    scores = score_groups(ours, groups, batch_size=2)  # rows of different lengths share a batch: padding
    for group, got in zip(groups, scores):
        for cont, score in zip(group.continuations, got):
            want, greedy = reference_scores(hf, group.context, cont)
            assert abs(score.logprob - want) <= 1e-4
            assert score.greedy == greedy and score.tokens == len(cont)


def test_long_contexts_are_cut_from_the_left(tmp_path):
    hf, ours = hf_model_and_ours("llama-gqa", tmp_path)
    context, cont = list(range(1, 40)), [5, 6, 7]
    got = score_groups(ours, [Group(context, [cont])], max_length=16)[0][0]
    # 16 input tokens: the last 14 of the context and the first two continuation tokens
    want, _ = reference_scores(hf, context[-14:], cont)
    assert abs(got.logprob - want) <= 1e-4


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 137))
    windows = rolling_windows(tokens, prefix_token=1, max_length=10)
    assert windows[0].context == [1]
    predicted = [t for w in windows for t in w.continuations[0]]
    assert predicted == tokens
    for w in windows:
        cont = w.continuations[0]
        assert len(w.context) + len(cont) - 1 <= 10  # the model input fits the window
        if w is not windows[0]:  # the context is exactly the tokens before the continuation
            start = tokens.index(cont[0])
            assert w.context == tokens[start - len(w.context):start]
    assert len(windows[-1].context) == 10 - len(windows[-1].continuations[0]) + 1  # last window: full context
