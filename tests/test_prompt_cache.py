"""The prompt cache on the real SmolLM2-135M-Instruct: prompts that share a long prefix give the tokens and
the first-step logits they give without it (float model and the default int4 one, batched with ragged
suffixes), the prefix is computed once across calls, and a later batch that shares only part of it reuses
that part."""

import pytest
import torch

import slmkit
from slmkit.engine.generate import prefill
from slmkit.engine.kv_cache import KVCache
from slmkit.engine.prompt_cache import PromptCache
from slmkit.nn.quant import compact_path

pytestmark = pytest.mark.slow

CONTEXT = ("Review: a gorgeous, witty, seductive movie.\nSentiment: positive\n\n"
           "Review: the plot is nothing but boilerplate clichés.\nSentiment: negative\n\n"
           "Review: an utterly charming and hilarious film.\nSentiment: positive\n\n")
TESTS = ["Review: it is a dull, lifeless mess.\nSentiment:",
         "Review: one of the year's best.\nSentiment:",
         "Review: I walked out after twenty minutes of this tedious, overlong and badly acted film.\nSentiment:"]


@pytest.fixture(scope="module", params=["none", "int4"])
def lm(request, smollm2_gguf):
    """The float model, and int4 on its block kernel alone: by default int4 runs many rows through bf16
    tiles (activations unquantized) and few through the block kernel (activations int8), so splitting a
    prompt changes which rounding a later near-tie sees -- test_default_int4_path covers that case."""
    model = slmkit.load(smollm2_gguf, quant=request.param)
    if request.param == "none":
        yield model
    else:
        with compact_path("avx2"):
            yield model


def same(got, want, lm) -> bool:
    return got.token_ids == want.token_ids and got.text == want.text


def test_default_int4_path(smollm2_gguf):
    lm = slmkit.load(smollm2_gguf)
    prompts = [CONTEXT + t for t in TESTS]
    plain = lm.complete(prompts, max_new_tokens=2)
    got = lm.complete(prompts, max_new_tokens=2, prompt_cache=PromptCache())
    assert [c.text for c in got] == [c.text for c in plain]
    assert [c.text.strip() for c in got] == ["negative", "positive", "negative"]


def test_shared_prefix_gives_the_same_answers(lm):
    prompts = [CONTEXT + t for t in TESTS]
    plain = lm.complete(prompts, max_new_tokens=6)
    cache = PromptCache()
    first = lm.complete(prompts, max_new_tokens=6, prompt_cache=cache)
    assert all(same(g, w, lm) for g, w in zip(first, plain))
    assert cache.computed_tokens == len(cache.ids) > 40 and cache.hits == 0
    # one prompt at a time: the context comes from the cache, each prompt runs only its own tokens
    for t in TESTS:
        want = lm.complete([CONTEXT + t], max_new_tokens=6)[0]
        got = lm.complete([CONTEXT + t], max_new_tokens=6, prompt_cache=cache)[0]
        assert same(got, want, lm)
    assert cache.hits == 3
    shared = len(lm.tokenizer.encode(CONTEXT)) - 2  # the context's tokens, less what merges at the seam
    assert cache.reused_tokens >= 3 * shared


def test_reused_prefix_logits_match_the_whole_prompt(lm):
    """The first generated token's logits from cached-prefix + suffix equal a plain prefill of the prompt, to
    the rounding of a different chunking. int4 rounds each layer's activation to int8 blocks, so a last-bit
    change in attention (masked vs causal SDPA) can flip one rounding and grow through 30 layers: measured on
    the avx2 and torch block paths, splitting this prompt anywhere moves the logits by 0 to 0.61 (of 26), never
    the top choice; the float model by < 1e-3."""
    ids = lm.tokenizer.encode(CONTEXT + TESTS[2])
    model, cfg = lm.model, lm.config
    dtype = getattr(model, "cache_dtype", model.dtype)
    whole = prefill(model, torch.tensor([ids]), torch.arange(len(ids))[None], None,
                    KVCache(cfg, 1, len(ids), dtype))
    cache = PromptCache()
    n = cache.prefix_for(model, [ids], lambda p, keep, k, v: _prefix(model, p, dtype))
    assert n == len(ids) - 1
    kv = KVCache(cfg, 1, len(ids), dtype)
    for layer in range(cfg.n_layers):
        kv.keys[layer][:, :, :n] = cache.keys[layer]
        kv.values[layer][:, :, :n] = cache.values[layer]
    split = prefill(model, torch.tensor([ids[n:]]), torch.arange(n, len(ids))[None], None, kv, start=n)
    margin = 2e-3 if lm.model.quant == "none" else 1.0
    assert (split - whole).abs().max() < margin and split.argmax() == whole.argmax()


def _prefix(model, ids, dtype):
    kv = KVCache(model.cfg, 1, len(ids), dtype)
    prefill(model, torch.tensor([ids]), torch.arange(len(ids))[None], None, kv)
    return kv.keys, kv.values


def test_partial_reuse_and_short_prefixes(lm):
    cache = PromptCache(min_tokens=8)
    lm.complete([CONTEXT + TESTS[0], CONTEXT + TESTS[1]], max_new_tokens=2, prompt_cache=cache)
    before = cache.computed_tokens
    other = CONTEXT.split("\n\n")[0] + "\n\nReview: bland.\nSentiment:"  # shares only the first demonstration
    plain = lm.complete([other], max_new_tokens=4)[0]
    got = lm.complete([other], max_new_tokens=4, prompt_cache=cache)[0]
    assert same(got, plain, lm)
    assert cache.hits == 1 and cache.computed_tokens - before < len(lm.tokenizer.encode(other))
    # prompts sharing fewer than min_tokens run as usual and leave the cache alone
    held = list(cache.ids)
    assert lm.complete(["Hi there", "Hello"], max_new_tokens=2, prompt_cache=cache)
    assert cache.ids == held


def test_another_model_never_reads_the_cache(lm, smollm2_gguf):
    cache = PromptCache()
    lm.complete([CONTEXT + TESTS[0]], max_new_tokens=1, prompt_cache=cache)
    other = slmkit.load(smollm2_gguf, quant="int8")
    want = other.complete([CONTEXT + TESTS[1]], max_new_tokens=3)[0]
    got = other.complete([CONTEXT + TESTS[1]], max_new_tokens=3, prompt_cache=cache)[0]
    assert got.token_ids[:2] == want.token_ids[:2] and cache.hits == 0
