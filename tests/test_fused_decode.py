"""The fused decode layer (one C++ call per layer, models/fused_decode.py) against the eager path it replaces."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

import slmkit
from slmkit import kernels
from slmkit.config import ModelConfig
from slmkit.engine.batcher import Batcher, Sequence
from slmkit.engine.generate import generate
from slmkit.engine.kv_cache import KVCache
from slmkit.engine.sampling import SamplingParams
from slmkit.formats.compact import build_compact, compact_state
from slmkit.models.decoder import Decoder
from slmkit.nn.quant import dense_rows

DENSE_FROM = dense_rows()  # this CPU's crossover: 32 rows with native bf16, 128 where it is emulated

ops = kernels.load()
pytestmark = pytest.mark.skipif(ops is None, reason="the fused layer needs slmkit's kernels (x86 AVX2, a C++ compiler)")


def tiny_compact(mode: str, qkv_bias: bool = False) -> Decoder:
    """A 2-layer Llama / Qwen2-shaped compact model with random weights (GQA: 4 query heads, 2 KV heads)."""
    cfg = ModelConfig(family="qwen2" if qkv_bias else "llama", vocab_size=128, hidden_size=64, n_layers=2,
                      n_heads=4, n_kv_heads=2, intermediate_size=96, qkv_bias=qkv_bias, tie_word_embeddings=True)
    torch.manual_seed(3)
    weights = Decoder(cfg).state_dict()
    for key, value in weights.items():
        if key.endswith("bias") or "norm" in key:
            weights[key] = value + 0.1 * torch.randn_like(value)  # non-trivial biases and norm weights
    return build_compact(cfg, compact_state(cfg, weights, mode), mode, torch.float32, "test")


def eager(model: Decoder) -> Decoder:
    model._fused_layers = None  # the layer-by-layer torch path
    return model


def assert_close_steps(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Per step and row, logits within float rounding (~1e-7 relative measured) -- except that RoPE's cos/sin (C
    library vs torch, an ulp apart) can flip one int8 (or, on the dense path, bf16) rounding of an activation,
    which moves that row's logits by about one quantization step (~2e-3 measured) from then on; so most
    (step, row) pairs must be exact to 1e-5 and none off by more than 1e-2."""
    errors = torch.cat([((g - w).reshape(len(w), -1).norm(dim=-1) / w.reshape(len(w), -1).norm(dim=-1))
                        for g, w in zip(got, want)]).tolist()
    assert max(errors) <= 1e-2, errors
    assert sum(e <= 1e-5 for e in errors) >= 0.8 * len(errors), errors


def decode_logits(model: Decoder, prompt: torch.Tensor, steps: int, key_valid=None, fed=None,
                  cache_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Logits of a prefill then ``steps`` one-token steps that feed fixed tokens (``fed``, or a pattern), with
    a KV cache of ``cache_dtype`` (default: the model's choice, ``Decoder.cache_dtype``)."""
    b, t = prompt.shape
    cache = KVCache(model.cfg, b, t + steps, cache_dtype or model.cache_dtype)
    out = []
    with torch.inference_mode():
        kv = None if key_valid is None else key_valid[:, :t]
        positions = None if kv is None else (kv.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
        out.append(model(prompt, positions, kv, cache, 0, last_only=True))
        for i in range(steps):
            token = torch.full((b, 1), fed[i] if fed is not None else (7 * i + 5) % 128)
            kv = None if key_valid is None else key_valid[:, :t + i + 1]
            positions = torch.full((b, 1), t + i) if key_valid is None else kv.sum(-1, keepdim=True) - 1
            out.append(model(token, positions, kv, cache, t + i, last_only=True))
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [3, DENSE_FROM])  # a batch of DENSE_FROM rows takes the dense path in both
def test_fused_steps_match_the_eager_layers(mode, qkv_bias, cache_dtype, rows):
    fused = tiny_compact(mode, qkv_bias)
    assert fused._fused_decode_layers() is not None, "the fused path should cover this model"
    prompt = torch.randint(0, 128, (rows, 6), generator=torch.Generator().manual_seed(1))
    got = decode_logits(fused, prompt, 12, cache_dtype=cache_dtype)
    want = decode_logits(eager(tiny_compact(mode, qkv_bias)), prompt, 12, cache_dtype=cache_dtype)
    assert_close_steps(got, want)


def test_compact_models_keep_a_float16_cache():
    """Where the fused layers decode, the KV cache is float16 (half the bytes a step reads); the fused
    write rounds as torch's cast does, so prefill (eager) and decode (fused) slots hold the same kind of
    values; elsewhere the cache keeps the model's dtype."""
    model = tiny_compact("int4")
    assert model.cache_dtype == torch.float16
    assert eager(tiny_compact("int4")).cache_dtype == torch.float32
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    cache = KVCache(model.cfg, 2, 7, model.cache_dtype)
    with torch.inference_mode():
        model(prompt, None, None, cache, 0, last_only=True)
        model(torch.tensor([[3], [4]]), torch.tensor([[5], [5]]), None, cache, 5, last_only=True)
    # slot 5 came from DecodeLayer's own float16 store; an eager step on a float32 cache gives the key
    # whose rounding must equal it
    reference = KVCache(model.cfg, 2, 7, torch.float32)
    with torch.inference_mode():
        plain = eager(tiny_compact("int4"))
        plain(prompt, None, None, reference, 0, last_only=True)
        plain(torch.tensor([[3], [4]]), torch.tensor([[5], [5]]), None, reference, 5, last_only=True)
    # layer 0's keys/values depend on the tokens alone (later layers also on attention over the float16
    # cache), so there they must be the float32 ones rounded: within one float16 ulp (RoPE's cos/sin differ
    # by a float ulp between the two paths)
    for got, want in ((cache.keys[0], reference.keys[0]), (cache.values[0], reference.values[0])):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got[:, :, :6].float(), want[:, :, :6].half().float(), atol=1e-4, rtol=1e-3)


def test_fused_steps_respect_left_padding():
    model = tiny_compact("int8")
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(2, 5 + 6, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is a 2-token prompt, left-padded
    half = torch.float16  # the compact model's own cache; the eager path is given the same
    got = decode_logits(model, prompt, 6, valid, cache_dtype=half)
    want = decode_logits(eager(tiny_compact("int8")), prompt, 6, valid, cache_dtype=half)
    assert_close_steps(got, want)
    # and the padded row equals that row decoded alone, without padding
    alone = decode_logits(tiny_compact("int8"), prompt[1:, 3:], 6, cache_dtype=half)
    assert_close_steps([g[1:] for g in got], alone)


def test_decode_layer_names_bad_inputs():
    model = tiny_compact("int8")
    layer = model._fused_decode_layers()[0]
    cache = KVCache(model.cfg, 2, 8, torch.float32)
    keys, values, slots, span = cache.decode_slots(3, 2)
    good = dict(x=torch.zeros(2, 64), positions=torch.tensor([3, 3]), keys=keys[0], values=values[0], slots=slots,
                span=span, valid=None, dense_rows=DENSE_FROM)
    layer.forward(**good)
    with pytest.raises(RuntimeError, match=r"x: contiguous float32 \[B, D\]"):
        layer.forward(**{**good, "x": torch.zeros(2, 63)})
    with pytest.raises(RuntimeError, match="slot lies outside the attended span"):
        layer.forward(**{**good, "slots": torch.tensor([3, 9])})
    with pytest.raises(RuntimeError, match=r"valid: bool \[B, span\]"):
        layer.forward(**{**good, "valid": torch.ones(2, span + 1, dtype=torch.bool)})
    with pytest.raises(RuntimeError, match="keys, values: float32 or float16, one dtype"):
        layer.forward(**{**good, "keys": keys[0].half()})


def test_batcher_rows_of_different_lengths_match_decoding_alone():
    model = tiny_compact("int8")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (5, 11, 3, 8)]
    params = SamplingParams(max_new_tokens=9)
    reference = eager(tiny_compact("int8"))
    want = [generate(reference, None, [p], params, eos_ids=set())[0].token_ids for p in prompts]
    done: dict[int, list[int]] = {}
    finished = threading.Event()

    def sink(i):
        def on_event(ev):
            if ev.done is not None:
                done[i] = ev.done.token_ids
                if len(done) == len(prompts):
                    finished.set()
        return on_event

    batcher = Batcher(model, None, set(), max_batch=3)  # the 4th waits for a free row
    batcher.start()
    try:
        for i, p in enumerate(prompts):
            batcher.submit(Sequence(p, params, sink(i)))
            time.sleep(0.01 * i)  # join while others are mid-way
        assert finished.wait(60)
    finally:
        batcher.stop()
    assert model._fused_layers is not None  # the batcher's steps went through the fused layers
    assert [done[i] for i in range(len(prompts))] == want


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_real_model_decoding_keeps_fp32_perplexity(mode, smollm2_gguf, shared_data):
    """SmolLM2 teacher-forced one token at a time through the fused layers over 400 tokens of real text:
    perplexity within 1 % of the fp32 model's. (Step by step the fused and eager paths part after the first
    int8 rounding that RoPE's last-ulp difference flips -- from then on they are two draws of the same
    quantization noise, as far from each other as from fp32, so this compares what the user gets.)"""
    with (shared_data / "pretrain_corpus" / "nltk_gutenberg.jsonl").open() as f:
        text = " ".join(json.loads(f.readline())["text"].split()[2000:2500])
    lm = slmkit.load(smollm2_gguf, quant=mode)
    ids = lm.tokenizer.encode(text)[:401]
    prompt, fed = torch.tensor([ids[:1]]), ids[1:-1]
    assert lm.model._fused_decode_layers() is not None
    got = torch.cat(decode_logits(lm.model, prompt, len(fed), fed=fed))[:, -1]
    want = torch.cat(decode_logits(slmkit.load(smollm2_gguf, quant="none").model, prompt, len(fed), fed=fed))[:, -1]
    target = torch.tensor(ids[1:])
    ppl_got = math.exp(torch.nn.functional.cross_entropy(got, target).item())
    ppl_want = math.exp(torch.nn.functional.cross_entropy(want, target).item())
    assert abs(ppl_got / ppl_want - 1) <= 0.01, f"{mode}: {ppl_got:.3f} vs fp32 {ppl_want:.3f}"
