"""Every compact path gives one answer: the block kernels' AVX-512 and AVX2 variants and their torch form agree
on real SmolLM2 layers to float32 rounding, the dense (bf16) path agrees with its own arithmetic, and each
path's perplexity on several documents is no worse than llama.cpp's on the same Q4_1 file plus 0.3 %.
Each path is forced (nn.quant.compact_path), so every machine tests every path its CPU can run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import slmkit
from slmkit import kernels
from slmkit.formats.gguf_model import file_quant
from slmkit.nn.quant import CompactLinear, compact_path

pytestmark = pytest.mark.slow

ops = kernels.load()
BLOCK_PATHS = ["torch"] + ([] if ops is None else ["avx2"] + (["avx512"] if ops.cpu_has_avx512() else []))
DOCUMENTS = ["nltk_gutenberg.jsonl", "nltk_inaugural.jsonl", "nltk_reuters21578_apte.jsonl",
             "nltk_brown_detagged.jsonl"]
WINDOW = 512


@pytest.fixture(scope="module")
def int4_lm(smollm2_gguf):
    lm = slmkit.load(smollm2_gguf)  # the default: the Q4_1 file runs as int4
    assert lm.model.quant == "int4"
    return lm


@pytest.fixture(scope="module")
def windows(int4_lm, shared_data) -> list[list[int]]:
    """One 512-token window from each of four corpora (2,044 scored tokens): words 1000-2000 of the file's
    text, so every window starts inside running prose."""
    out = []
    for name in DOCUMENTS:
        with (shared_data / "pretrain_corpus" / name).open() as f:
            words = " ".join(json.loads(line)["text"] for line in f).split()
        out.append(int4_lm.tokenizer.encode(" ".join(words[1000:2000]))[:WINDOW])
    assert all(len(w) == WINDOW for w in out)
    return out


@pytest.fixture(scope="module")
def layer_inputs(int4_lm, windows) -> dict[str, tuple[CompactLinear, torch.Tensor]]:
    """Real activations entering the linears of layers 0, 15 and 29 and the output head (40 tokens of text)."""
    model, captured = int4_lm.model, {}
    names = [f"layers.{i}.{part}" for i in (0, 15, 29) for part in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")]

    def keep(name):
        def hook(module, args):  # returns None: the layer's input is left as it is
            captured.setdefault(name, (module, args[0].reshape(-1, args[0].shape[-1])))
        return hook

    hooks = [model.get_submodule(name).register_forward_pre_hook(keep(name)) for name in names]
    try:
        int4_lm.logits(windows[0][:40])
    finally:
        for hook in hooks:
            hook.remove()
    normed = model.features(torch.tensor([windows[0][:40]]))[0]
    captured["lm_head"] = (model.lm_head, normed)
    return captured


@pytest.mark.parametrize("path", BLOCK_PATHS)
def test_block_paths_agree_on_real_layers(path, layer_inputs):
    """The block paths round the activation identically (int8 blocks of 32), so they differ only in the order
    of float32 additions; 12 rows stay below the dense path's threshold."""
    for name, (layer, x) in layer_inputs.items():
        rows = x[:12].float().contiguous()
        with compact_path("torch"):
            want = layer(rows).double()
        with compact_path(path):
            got = layer(rows).double()
        scale = want.abs().max().item()
        worst = (got - want).abs().max().item() / scale
        assert worst <= 1e-5, f"{name} on {path}: max difference {worst:.2e} of max |y| {scale:.3g}"


def test_dense_path_matches_its_arithmetic(layer_inputs):
    """The dense path: activation and weight rounded to bf16, float32 sums, the sum rounded to bf16."""
    for name, (layer, x) in layer_inputs.items():
        rows = x.float().contiguous()
        with compact_path("dense"):
            got = layer(rows).double()
        weight = layer.dense_weight(slice(None), torch.float32).double()
        exact = rows.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().T
        if layer.bias is not None:
            exact = exact + layer.bias.double()
        # one bf16 rounding of the result (relative 2^-9), plus float32 sums in another order
        bound = exact.abs() * 2 ** -8 + 1e-4 * exact.abs().max()
        assert bool(((got - exact).abs() <= bound).all()), name


@pytest.mark.skipif(ops is None or not ops.cpu_has_avx512(), reason="needs slmkit's kernels on an AVX-512 CPU")
def test_dense_weights_are_the_same_bits_on_every_kernel_path(layer_inputs):
    """The dense path's weight expansion (kernels/dequantize.cpp) has an AVX-512 and an AVX2 form: one result."""
    for name, (layer, _) in layer_inputs.items():
        for dtype in (torch.bfloat16, torch.float32):
            with compact_path("avx512"):
                wide = layer.dense_weight(slice(None), dtype)
            with compact_path("avx2"):
                narrow = layer.dense_weight(slice(None), dtype)
            assert torch.equal(wide, narrow), f"{name} {dtype}"


def perplexity(lm, windows) -> float:
    total = 0.0
    for ids in windows:
        logits = lm.logits(ids)[0]
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
    return math.exp(total / sum(len(w) - 1 for w in windows))


@pytest.fixture(scope="module")
def llama_cpp_perplexity(smollm2_gguf, windows, open_llama) -> float:
    ref = open_llama(str(smollm2_gguf), n_ctx=WINDOW + 8, logits_all=True, n_threads=2, verbose=False)
    total = 0.0
    for ids in windows:
        ref.reset()
        ref.eval(ids)
        logits = torch.tensor(ref.scores[:len(ids)], dtype=torch.float32)
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
    return math.exp(total / sum(len(w) - 1 for w in windows))


@pytest.mark.parametrize("path", ["dense"] + BLOCK_PATHS)
def test_perplexity_no_worse_than_llama_cpp(path, int4_lm, windows, llama_cpp_perplexity):
    with compact_path(path):
        got = perplexity(int4_lm, windows)
    print(f"int4 on the {path} path: perplexity {got:.4f} vs llama.cpp {llama_cpp_perplexity:.4f} "
          f"({got / llama_cpp_perplexity - 1:+.2%}) over {len(windows)} x {WINDOW} tokens")
    assert got <= llama_cpp_perplexity * 1.003, (
        f"int4 on the {path} path: perplexity {got:.4f} > llama.cpp {llama_cpp_perplexity:.4f} + 0.3 %")


# ------------------------------------------------------------------------------ the default follows the file
class FakeTensor:
    def __init__(self, type_name: str, shape: tuple[int, ...]):
        self.type_name, self.shape = type_name, shape


class FakeGGUF:
    def __init__(self, types: dict[str, str]):
        self.tensors = {name: FakeTensor(kind, (64, 64) if "norm" not in name else (64,))
                        for name, kind in types.items()}


@pytest.mark.parametrize("kinds,want", [
    ({"attn_q": "Q4_1", "ffn_down": "Q4_1"}, ("int4", "Q4_1")),
    ({"attn_q": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}, ("int4", "Q4_K")),  # a Q4_K_M file
    ({"attn_q": "Q4_0", "ffn_down": "Q4_0"}, ("int4", "Q4_0")),
    ({"attn_q": "Q8_0", "ffn_down": "Q8_0"}, ("int8", "Q8_0")),
    ({"attn_q": "Q6_K", "ffn_down": "Q6_K"}, ("int8", "Q6_K")),
    ({"attn_q": "F16", "ffn_down": "F16"}, ("none", "F16")),
    ({"attn_q": "BF16", "ffn_down": "BF16"}, ("none", "BF16")),
    ({"attn_q": "F32", "ffn_down": "F32"}, ("none", "F32")),
])
def test_file_quant_follows_the_layers_storage(kinds, want):
    types = {f"blk.{i}.{part}.weight": kind for i in range(2) for part, kind in kinds.items()}
    types.update({"blk.0.attn_norm.weight": "F32", "token_embd.weight": "Q8_0"})  # neither decides
    assert file_quant(FakeGGUF(types)) == want


def test_default_load_runs_the_files_quantization(smollm2_gguf, int4_lm, tmp_path, capsys):
    assert int4_lm.info()["quantization"] == "int4"
    float_lm = slmkit.load(smollm2_gguf, quant="none")
    assert float_lm.model.quant == "none" and float_lm.info()["quantization"] == "none"
    # saving the default (compact) load writes the file's float weights, and says so
    folder = int4_lm.save(tmp_path / "hf")
    assert "float weights" in capsys.readouterr().err
    reloaded = slmkit.load(folder)  # an HF folder stays float by default
    assert reloaded.model.quant == "none"
    want = float_lm.model.state_dict()
    for key, value in reloaded.model.state_dict().items():
        assert torch.equal(value, want[key]), key
