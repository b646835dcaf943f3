"""engine/speculative.py: greedy output equals the target's own, the sampled output is distributed as the
target's (chi-square on a tiny vocabulary), and the bookkeeping of accepted tokens."""

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.engine.combine import Stream
from slmkit.engine.generate import generate
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.speculative import speculative_generate
from slmkit.errors import SlmError
from slmkit.models.decoder import Decoder

PROMPT = [3, 1, 4, 1, 5]


def decoder(seed: int, vocab: int = 64, hidden: int = 32, scale: float = 0.3) -> Decoder:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=128)
    model = Decoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model.eval()


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_is_the_targets_greedy_output(gamma):
    target, draft = decoder(1, hidden=64), decoder(2)
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    plain = generate(target, None, [PROMPT], params, eos_ids=set())[0].token_ids
    got, stats = speculative_generate(target, draft, PROMPT, params, gamma=gamma)
    assert got.token_ids == plain
    assert stats.accepted + stats.rounds == 20 or got.finish_reason == "stop"
    assert stats.accepted <= stats.drafted


def test_a_draft_equal_to_the_target_is_always_accepted():
    target = decoder(1)
    params = SamplingParams(max_new_tokens=17, temperature=0.0)
    got, stats = speculative_generate(target, target, PROMPT, params, gamma=4)
    assert stats.acceptance_rate == 1.0 and stats.rounds == 4  # 4 rounds of 4 drafts + 1 bonus = 20 >= 17
    assert got.token_ids == generate(target, None, [PROMPT], params, eos_ids=set())[0].token_ids


def test_eos_stops_and_bad_gamma_is_an_error():
    target, draft = decoder(1), decoder(2)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    plain = generate(target, None, [PROMPT], params, eos_ids=set())[0].token_ids
    got, _ = speculative_generate(target, draft, PROMPT, params, gamma=3, eos_ids={plain[4]})
    assert got.token_ids == plain[:plain.index(plain[4])] and got.finish_reason == "stop"
    with pytest.raises(SlmError, match="gamma"):
        speculative_generate(target, draft, PROMPT, params, gamma=0)
    with pytest.raises(SlmError, match="repetition penalty"):
        speculative_generate(target, draft, PROMPT, SamplingParams(max_new_tokens=3, repetition_penalty=1.2))


# chi-square critical values at p = 0.001 (df: value), from the chi-square table
CHI2_999 = {24: 51.18, 35: 66.62}


def test_sampled_pairs_follow_the_targets_distribution():
    """Two tokens sampled with gamma 1 (one drafted and verified, then a residual or bonus draw): the pair's
    frequencies over 6 x 6 outcomes match p(x1) p(x2 | x1) of the target."""
    vocab = 6
    target, draft = decoder(1, vocab=vocab, scale=0.5), decoder(7, vocab=vocab, scale=0.5)
    first = Stream(target, 8).feed(PROMPT).exp()
    joint = torch.stack([first[a] * Stream(target, 8).feed(PROMPT + [a]).exp() for a in range(vocab)])
    n = 3000
    counts = torch.zeros(vocab, vocab)
    drafted = accepted = 0
    for seed in range(n):
        params = SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed)
        got, stats = speculative_generate(target, draft, PROMPT, params, gamma=1)
        counts[got.token_ids[0], got.token_ids[1]] += 1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    expected = joint * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[vocab * vocab - 1], f"chi-square {chi2:.1f}: {counts} vs {expected}"
    assert 0 < accepted < drafted  # the draft differs from the target: some proposals are rejected


# ---- on the real SmolLM2 (int4, the file's own quantization): the verify pass agrees with plain decoding to the bit
def compact_paths():
    from slmkit import kernels

    ops = kernels.load()
    if ops is None:
        return ["torch"]
    return ["avx2"] + (["avx512"] if ops.cpu_has_avx512() else [])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    import slmkit

    return slmkit.load(str(smollm2_gguf))


@pytest.mark.parametrize("path", compact_paths())
def test_tokens_fed_together_equal_one_token_steps(smollm2, path):
    from slmkit.nn.quant import compact_path

    prompt = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog and", add_special_tokens=False)
    extra = [10, 200, 3000, 45, 77, 9, 123]  # 7 rows: a group of four and three single rows in the int4 kernel
    with compact_path(path):
        together, alone = Stream(smollm2.model, 64), Stream(smollm2.model, 64)
        together.feed_logits(prompt, 1)
        alone.feed_logits(prompt, 1)
        many = together.feed_logits(extra, len(extra))
        ones = torch.cat([alone.feed_logits([t], 1) for t in extra])
        plain = alone.feed_logits([5], 1)
        assert torch.equal(together.feed_logits([5], 1), plain)  # the caches agree too
    assert torch.equal(many, ones)


def test_self_draft_on_smollm2_accepts_everything_and_matches_greedy(smollm2):
    tok = smollm2.tokenizer
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    for question in ("Write a haiku about autumn.", "Explain photosynthesis briefly."):
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]), add_special_tokens=False)
        plain = generate(smollm2.model, None, [prompt], params, eos_ids=set())[0].token_ids
        got, stats = speculative_generate(smollm2.model, smollm2.model, prompt, params, gamma=4)
        assert got.token_ids == plain
        assert stats.acceptance_rate == 1.0


# ---- the EFT ensemble as the target: the small fine-tuned model drafts for large base + (small ft - small base)
def eft_target(vocab: int = 64, scale: float = 0.3):
    from slmkit.engine.combine import Delta, Ensemble

    large, small_ft, small = (decoder(11, vocab=vocab, hidden=64, scale=scale), decoder(12, vocab=vocab, scale=scale),
                              decoder(13, vocab=vocab, scale=scale))
    return Ensemble(large, [Delta(small_ft, small, 1.0)]), small_ft


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_over_the_eft_ensemble_is_its_own_greedy_output(gamma):
    from slmkit.engine.combine import generate_combined

    target, draft = eft_target()
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    plain = generate_combined(target.base, target.deltas, PROMPT, params).token_ids
    got, stats = speculative_generate(target, draft, PROMPT, params, gamma=gamma)
    assert got.token_ids == plain
    assert 0 < stats.accepted < stats.drafted


def test_sampled_pairs_follow_the_eft_ensembles_distribution():
    vocab = 6
    target, draft = eft_target(vocab=vocab, scale=0.5)
    first = target.stream(8).feed(PROMPT).exp()
    joint = torch.stack([first[a] * target.stream(8).feed(PROMPT + [a]).exp() for a in range(vocab)])
    n = 2000
    counts = torch.zeros(vocab, vocab)
    for seed in range(n):
        params = SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed)
        got, _ = speculative_generate(target, draft, PROMPT, params, gamma=1)
        counts[got.token_ids[0], got.token_ids[1]] += 1
    expected = joint * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[vocab * vocab - 1], f"chi-square {chi2:.1f}: {counts} vs {expected}"
