"""engine/combine.py: models in lock-step on one token stream and the EFT combination, against full
recomputation without caches and against the plain engine."""

from types import SimpleNamespace

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.engine.combine import Delta, Stream, check_shared_vocab, combine, eft_deltas, generate_combined
from slmkit.engine.generate import generate
from slmkit.engine.sampling import SamplingParams
from slmkit.errors import SlmError
from slmkit.models.decoder import Decoder

PROMPT = [3, 17, 5, 42, 8, 1]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def decoder(seed: int, hidden: int = 32, layers: int = 2, vocab: int = 64) -> Decoder:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, n_layers=layers, n_heads=4, n_kv_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=128)
    model = Decoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def family():
    return {"large": decoder(1, hidden=64, layers=3), "small_ft": decoder(2), "small_base": decoder(3)}


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities after ``ids``, recomputed from scratch (no cache reuse)."""
    stream = Stream(model, len(ids))
    return stream.feed(ids)


def test_stream_matches_recomputing_from_scratch(family):
    model = family["large"]
    stream = Stream(model, 32)
    ids = list(PROMPT)
    got = stream.feed(ids)
    for token in (9, 33, 2, 60):
        torch.testing.assert_close(got, full_logprobs(model, ids), atol=1e-5, rtol=0)
        ids.append(token)
        got = stream.feed([token])
    torch.testing.assert_close(got, full_logprobs(model, ids), atol=1e-5, rtol=0)


def test_beta_zero_is_the_large_base_exactly(family):
    plain = generate(family["large"], None, [PROMPT], GREEDY, eos_ids=set())[0].token_ids
    eft = generate_combined(family["large"], eft_deltas(family["small_ft"], family["small_base"], beta=0.0),
                            PROMPT, GREEDY)
    assert eft.token_ids == plain and len(plain) == 12
    base = full_logprobs(family["large"], PROMPT)
    delta = full_logprobs(family["small_ft"], PROMPT) - full_logprobs(family["small_base"], PROMPT)
    torch.testing.assert_close(combine(base, [(0.0, delta, torch.zeros_like(delta))]), base, atol=1e-6, rtol=0)


def test_eft_follows_the_formula_token_by_token(family):
    """Greedy EFT with beta 1.5, replayed by recomputing every model from scratch at each step."""
    beta = 1.5
    got = generate_combined(family["large"], eft_deltas(family["small_ft"], family["small_base"], beta=beta),
                            PROMPT, GREEDY)
    ids = list(PROMPT)
    for token in got.token_ids:
        scores = torch.log_softmax(full_logprobs(family["large"], ids) + beta * (
            full_logprobs(family["small_ft"], ids) - full_logprobs(family["small_base"], ids)), dim=-1)
        top2 = scores.topk(2).values
        assert token == int(scores.argmax()) or float(top2[0] - top2[1]) < 1e-4  # a near-tie may go either way
        ids.append(token)
    assert got.token_ids != generate(family["large"], None, [PROMPT], GREEDY, eos_ids=set())[0].token_ids


def test_base_equal_to_reference_gives_the_tuned_model(family):
    """log p_S + (log p_F - log p_S) = log p_F: the combination is the fine-tuned model itself."""
    tuned = generate(family["small_ft"], None, [PROMPT], GREEDY, eos_ids=set())[0].token_ids
    got = generate_combined(family["small_base"], [Delta(family["small_ft"], family["small_base"], 1.0)],
                            PROMPT, GREEDY)
    assert got.token_ids == tuned


def test_helpful_harmless_mix_weights():
    a, b, c = object(), object(), object()
    mix = eft_deltas(a, c, beta=2.0, harmless=b, lam=0.25)
    assert [(d.tuned, d.reference, d.weight) for d in mix] == [(a, c, 0.5), (b, c, 1.5)]
    with pytest.raises(SlmError, match="lam"):
        eft_deltas(a, c, lam=1.5)


def test_eos_ends_and_sampling_is_seeded(family):
    first = generate_combined(family["large"], [], PROMPT, GREEDY).token_ids[0]
    done = generate_combined(family["large"], [], PROMPT, GREEDY, eos_ids={first})
    assert done.token_ids == [] and done.finish_reason == "stop"
    sample = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5)
    deltas = eft_deltas(family["small_ft"], family["small_base"], beta=1.0)
    assert generate_combined(family["large"], deltas, PROMPT, sample).token_ids == \
        generate_combined(family["large"], deltas, PROMPT, sample).token_ids


def test_different_tokenizers_are_an_error(family):
    with pytest.raises(SlmError, match="different vocabulary sizes"):
        check_shared_vocab([family["large"], decoder(4, vocab=80)])

    def tok(vocab):
        return SimpleNamespace(backend=SimpleNamespace(get_vocab=lambda with_added_tokens=True: vocab))

    same = {"a": 0, "b": 1}
    assert check_shared_vocab([family["large"], family["small_ft"]], [tok(same), tok(dict(same))]) == 2
    with pytest.raises(SlmError, match="different tokenizers"):
        check_shared_vocab([family["large"], family["small_ft"]], [tok(same), tok({"a": 0, "c": 1})])
