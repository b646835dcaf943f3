"""Compact (int8 / int4) weights: accuracy against the fp32 path, checkpoints, and the shared tied table."""

import json
import math
import subprocess
import sys

import pytest
import torch

import slmkit
from slmkit.nn.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_ids(smollm2_gguf, shared_data):
    lm = slmkit.load(smollm2_gguf)
    with (shared_data / "pretrain_corpus" / "nltk_gutenberg.jsonl").open() as f:
        doc = json.loads(f.readline())
    return lm.tokenizer.encode(" ".join(doc["text"].split()[1000:1600]))[:512]


def perplexity(lm, ids) -> float:
    logits = lm.logits(ids)[0]
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_perplexity_within_one_percent_of_fp32(mode, smollm2_gguf, text_ids):
    ref = perplexity(slmkit.load(smollm2_gguf, quant="none"), text_ids)
    got = perplexity(slmkit.load(smollm2_gguf, quant=mode), text_ids)
    assert abs(got / ref - 1) <= 0.01, f"{mode}: perplexity {got:.3f} vs fp32 {ref:.3f}"


def test_quantized_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(3, 128)
    q8, s8 = quantize_int8(w)
    ref8 = x @ (q8.float() * s8[:, None]).T
    got8 = Int8Linear(q8, s8, None)(x)  # slmkit's kernel (x rounded to int8 blocks) or torch's (x in bf16)
    assert (got8 - ref8).norm() / ref8.norm() < 0.01
    codes, scale, minimum = quantize_int4(w)
    deq = codes.float().reshape(64, 4, 32) * scale[..., None] + minimum[..., None]
    assert (deq.reshape(64, 128) - w).abs().max() <= scale.max() / 2 + 1e-6  # rounding error bound
    ref4 = x @ deq.reshape(64, 128).T
    got4 = Int4Linear(codes, scale, minimum, None)(x)  # slmkit's kernel (float16 scales, int8 x) or torch's
    assert (got4 - ref4).norm() / ref4.norm() < 0.02


def test_tied_table_is_held_once(smollm2_gguf):
    lm = slmkit.load(smollm2_gguf, quant="int8")
    model = lm.model
    assert model.embed.head[0] is model.lm_head
    table = model.lm_head.weight_int8
    assert table.dtype == torch.int8 and table.shape == (49152, 576)
    big = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel() >= 49152 * 576]
    assert len(big) == 1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_slm_quantize_round_trip(mode, smollm2_gguf, text_ids, tmp_path):
    out = tmp_path / f"smollm2-{mode}"
    proc = subprocess.run([sys.executable, "-m", "slmkit", "quantize", str(smollm2_gguf), str(out), "--quant", mode],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    reloaded = slmkit.load(out)
    assert reloaded.model.quant == mode
    direct = slmkit.load(smollm2_gguf, quant=mode)
    ids = text_ids[:64]
    assert torch.equal(reloaded.logits(ids), direct.logits(ids))
    # No greedy-text check here: on "What is the capital of France?" the first token is a near-tie even in
    # fp32 ("The" 25.325 vs "L" 25.243), and the compact models' activation rounding (int8 blocks, ~0.4 on
    # these logits) decides it either way -- the AVX2 and AVX-512 kernels, equal to 1e-5 per matmul, land on
    # different sides. Their quality is held by the perplexity tests in this file.


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compact_logits_track_llama_cpp(mode, smollm2_gguf, text_ids, open_llama):
    """llama.cpp runs the packaged Q4_1 file with int8-rounded activations, as our kernels do: the compact
    paths' next-token choices and perplexity on real text must follow it."""
    ids = text_ids[:256]
    ref_model = open_llama(str(smollm2_gguf), n_ctx=len(ids) + 8, logits_all=True, n_threads=2, verbose=False)
    ref_model.eval(ids)
    ref = torch.tensor(ref_model.scores[:len(ids)], dtype=torch.float32)
    ours = slmkit.load(smollm2_gguf, quant=mode).logits(ids)[0]
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    target = torch.tensor(ids[1:])
    ppl_ours = math.exp(torch.nn.functional.cross_entropy(ours[:-1], target).item())
    ppl_ref = math.exp(torch.nn.functional.cross_entropy(ref[:-1], target).item())
    print(f"{mode}: top-1 agreement {agreement:.3f}, perplexity {ppl_ours:.3f} vs llama.cpp {ppl_ref:.3f}")
    assert agreement >= 0.9, f"top-1 agreement with llama.cpp {agreement:.3f}"
    assert abs(ppl_ours / ppl_ref - 1) <= 0.02, f"perplexity {ppl_ours:.3f} vs llama.cpp {ppl_ref:.3f}"
