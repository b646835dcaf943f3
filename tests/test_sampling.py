"""Sampling logic against transformers' logits processors, on random logits (no checkpoint needed).

The filters (repetition penalty, temperature, top-k, top-p, min-p) must remove exactly the tokens that
transformers' processors remove, applied in the same order, and leave the same values on the rest.
"""

import math

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.engine.generate import generate
from slmkit.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits, next_tokens
from slmkit.errors import SlmError
from slmkit.models.decoder import Decoder

lp = pytest.importorskip("transformers.generation.logits_process")

VOCAB = 1000
BATCH = 4


def random_logits(seed: int, ties: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties at every top-k / top-p / min-p boundary
        return torch.randint(-4, 5, (BATCH, VOCAB), generator=gen).float() * 0.75
    return torch.randn(BATCH, VOCAB, generator=gen) * 3


def random_seen(seed: int, n: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, VOCAB, (BATCH, n), generator=gen)  # repeats included


def ours(logits: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What next_tokens samples from (before softmax), for temperature > 0."""
    x = logits.float()
    if p.repetition_penalty != 1.0:
        x = apply_repetition_penalty(x, seen, p.repetition_penalty)
    return filter_logits(x, p)


def reference(logits: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' processors, built and ordered the way GenerationMixin._get_logits_processor does."""
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k:
        procs.append(lp.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(lp.MinPLogitsWarper(p.min_p))
    x = logits.float()
    for proc in procs:
        x = proc(seen, x)
    return x


def assert_same_filter(got: torch.Tensor, want: torch.Tensor):
    removed_got, removed_want = torch.isneginf(got), torch.isneginf(want)
    assert torch.equal(removed_got, removed_want), (
        f"kept per row: ours {(~removed_got).sum(-1).tolist()}, transformers {(~removed_want).sum(-1).tolist()}")
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got[~removed_got], want[~removed_want], rtol=1e-6, atol=1e-6)


CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.0, top_k=20),
    "top_k_1": dict(temperature=1.0, top_k=1),
    "top_k_above_vocab": dict(temperature=1.0, top_k=VOCAB + 5),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "top_p_tiny_keeps_one": dict(temperature=1.0, top_p=1e-6),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "min_p_1": dict(temperature=1.0, min_p=1.0),
    "repetition_penalty": dict(temperature=1.0, repetition_penalty=1.3),
    "repetition_reward": dict(temperature=1.0, repetition_penalty=0.7),
    "all_hot": dict(temperature=1.5, top_k=200, top_p=0.8, min_p=0.02, repetition_penalty=1.2),
    "all_cold": dict(temperature=0.3, top_k=50, top_p=0.95, min_p=0.1, repetition_penalty=1.1),
    "top_k_then_top_p": dict(temperature=0.8, top_k=10, top_p=0.5),
    "top_p_then_min_p": dict(temperature=1.2, top_p=0.7, min_p=0.2),
}


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("name", list(CASES))
def test_filters_equal_transformers(name, ties):
    p = SamplingParams(**CASES[name])
    for seed in range(3):
        logits, seen = random_logits(seed, ties), random_seen(seed)
        got, want = ours(logits, seen, p), reference(logits, seen, p)
        assert_same_filter(got, want)
        assert torch.isfinite(got).any(-1).all(), "every row keeps at least one token"


def test_filters_actually_filter():
    """Guard against a vacuous comparison: each filter removes tokens, and the count is the expected one."""
    logits = random_logits(0)
    seen = random_seen(0)
    kept = lambda **kw: (~torch.isneginf(ours(logits, seen, SamplingParams(**kw)))).sum(-1)  # noqa: E731
    assert kept(temperature=1.0).eq(VOCAB).all()
    assert kept(temperature=1.0, top_k=20).eq(20).all()
    assert kept(temperature=1.0, top_p=1e-6).eq(1).all()
    n_top_p = kept(temperature=1.0, top_p=0.9)
    assert (n_top_p > 1).all() and (n_top_p < VOCAB).all()
    # smallest set whose probability reaches top_p
    probs = logits.softmax(-1).sort(-1, descending=True).values
    for row, n in enumerate(n_top_p.tolist()):
        assert probs[row, :n].sum() >= 0.9 - 1e-5 and probs[row, :n - 1].sum() < 0.9
    n_min_p = kept(temperature=1.0, min_p=0.05)
    probs = logits.softmax(-1)
    assert torch.equal(n_min_p, (probs >= 0.05 * probs.max(-1, keepdim=True).values).sum(-1))


def test_temperature_is_applied_before_top_p_and_min_p():
    """Order matters: a cold temperature sharpens the distribution before top-p / min-p see it."""
    logits, seen = random_logits(1), random_seen(1)
    warm = (~torch.isneginf(ours(logits, seen, SamplingParams(temperature=2.0, top_p=0.9)))).sum()
    cold = (~torch.isneginf(ours(logits, seen, SamplingParams(temperature=0.5, top_p=0.9)))).sum()
    assert cold < warm


def test_repetition_penalty_is_ctrl_style_once_per_token():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    seen = torch.tensor([[0, 1, 0, 0, 1]])  # repeats: penalised once, not per occurrence
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.5]]))
    ref = lp.RepetitionPenaltyLogitsProcessor(2.0)(seen, logits.clone())
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------------------------ greedy
def test_greedy_is_argmax():
    logits = random_logits(2)
    p = SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.5)  # filters are irrelevant to greedy
    assert torch.equal(next_tokens(logits, p, None, None), logits.argmax(-1))


def test_greedy_with_repetition_penalty_is_argmax_of_penalised_logits():
    logits, seen = random_logits(3), random_seen(3)
    # make the penalty decide: each row's best token is in its history, with a runner-up close behind
    best = logits.argmax(-1)
    seen[:, 0] = best
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    want = lp.RepetitionPenaltyLogitsProcessor(1.5)(seen, logits.clone()).argmax(-1)
    got = next_tokens(logits, p, seen, None)
    assert torch.equal(got, want)
    assert not torch.equal(got, best), "the penalty should change at least one row's choice"


# ------------------------------------------------------------------------------------------------ sampling
def test_samples_follow_the_filtered_distribution():
    """Draws land only on kept tokens, with frequencies matching softmax of the filtered logits."""
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(1, 12, generator=gen) * 2
    p = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    target = filter_logits(row.float(), p).softmax(-1)[0]
    n = 40_000
    draws = next_tokens(row.expand(n, -1), p, None, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=12).float() / n
    assert (freq[target == 0] == 0).all(), "sampled a filtered-out token"
    assert (target > 0).sum() >= 3
    # 5 standard errors of a binomial proportion
    tol = 5 * torch.sqrt(target * (1 - target) / n) + 1e-4
    assert ((freq - target).abs() <= tol).all(), f"{freq} vs {target}"


def tiny_decoder(vocab: int = 64) -> Decoder:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=48,
                      max_position_embeddings=128)
    model = Decoder(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)  # soft distributions: sampling varies
    return model.eval()


def sample_ids(model, **kw) -> list[list[int]]:
    params = SamplingParams(**{"max_new_tokens": 8, "temperature": 1.0, **kw})
    return [c.token_ids for c in generate(model, None, [[1, 2, 3], [4, 5]], params, eos_ids=set())]


def test_seed_reproducible_and_seed_dependent():
    model = tiny_decoder()
    a, b = sample_ids(model, seed=7), sample_ids(model, seed=7)
    assert a == b
    assert len(a[0]) == 8
    assert sample_ids(model, seed=8) != a
    assert sample_ids(model, seed=7, top_p=0.9) == sample_ids(model, seed=7, top_p=0.9)
    # greedy ignores the seed
    assert sample_ids(model, seed=1, temperature=0.0) == sample_ids(model, seed=2, temperature=0.0)


def test_unseeded_sampling_leaves_the_global_rng_alone():
    """Without a seed each call draws fresh randomness, but torch's global RNG state is not reseeded."""
    model = tiny_decoder()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = sample_ids(model)
    assert torch.equal(torch.rand(4), expected), "generation reseeded torch's global RNG"
    assert any(sample_ids(model) != first for _ in range(3)), "unseeded sampling repeats itself"


def test_empty_batch_gives_no_completions():
    assert generate(tiny_decoder(), None, [], SamplingParams(max_new_tokens=4), eos_ids=set()) == []


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw, name", [
    (dict(top_p=0), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(seed=1.5), "seed"),
])
def test_invalid_values_raise_slm_error_naming_the_parameter(kw, name):
    with pytest.raises(SlmError, match=name):
        SamplingParams(**kw)


def test_boundary_values_are_accepted():
    SamplingParams(top_p=1.0, temperature=0.0, max_new_tokens=0, top_k=0, min_p=0.0)
    SamplingParams(min_p=1.0, top_p=1e-9, repetition_penalty=1e-3, seed=0)
    assert SamplingParams(stop="###").stop == ["###"]
