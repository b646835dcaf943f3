"""LoRA: the adapted forward, merging, and PEFT adapter files checked against peft itself.

Tiny random models of every family slmkit maps (built with transformers, read by slmkit) and the real
SmolLM2. An adapter slmkit writes must give, in ``peft.PeftModel``, the logits of slmkit's merged
model; an adapter peft writes must give in slmkit the logits it gives in peft.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import slmkit  # noqa: E402
from slmkit.errors import SlmError  # noqa: E402
from slmkit.formats.hf import read_hf_config, read_hf_state_dict  # noqa: E402
from slmkit.formats.peft import load_peft_adapter, save_peft_adapter  # noqa: E402
from slmkit.models.build import build_decoder  # noqa: E402
from slmkit.nn.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora  # noqa: E402

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=97,
             max_position_embeddings=128)
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def tiny_config(name: str):
    return {
        "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
        "phi": lambda: transformers.PhiConfig(**SMALL, num_key_value_heads=4, partial_rotary_factor=0.5),
        "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
        "gemma3": lambda: transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=32, sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention"],
                                                        query_pre_attn_scalar=24),
    }[name]()


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def tiny_pair(name: str, tmp_path: Path):
    """(HF model, slmkit Decoder) holding the same random weights; a fresh HF model on every call."""
    folder = tmp_path / f"hf-{name}"
    if not folder.is_dir():
        hf = transformers.AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
        randomize(hf)
        hf.save_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = read_hf_config(folder)
    ours = build_decoder(cfg, read_hf_state_dict(folder, cfg.family), source=str(folder)).eval()
    return hf, ours


def random_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """B is zero after init (the adapter does nothing); make it matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)


def randomize_peft_b(peft_model, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def token_ids(vocab: int, t: int = 12, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------- the adapted forward


def test_fresh_adapter_changes_nothing_and_only_lora_trains(tmp_path):
    _, model = tiny_pair("llama", tmp_path)
    ids = token_ids(97)
    with torch.no_grad():
        base = model(ids)
    names = apply_lora(model, r=4, alpha=8, targets=("q", "v", "lm_head"))
    assert names == ["layers.0.attn.q", "layers.0.attn.v", "layers.1.attn.q", "layers.1.attn.v", "lm_head"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 10
    q = model.layers[0].attn.q
    assert q.scaling == 2.0 and q.lora_A.weight.abs().sum() > 0 and q.lora_B.weight.abs().sum() == 0
    with torch.no_grad():
        assert max_diff(model(ids), base) == 0.0  # B = 0: the adapter starts as a no-op

    model(ids).logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert q.lora_B.weight.grad.abs().sum() > 0  # A gets no gradient while B is 0; B does


def test_lora_forward_equals_merged_forward(tmp_path):
    _, model = tiny_pair("llama", tmp_path)
    ids = token_ids(97)
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, r=4, alpha=16, targets=ALL + ("lm_head",))
        random_lora_b(model)
        adapted = model(ids)
        merged_model = merge_lora(copy.deepcopy(model))
        merged = merged_model(ids)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert type(merged_model.layers[1].mlp.down) is torch.nn.Linear
    assert max_diff(adapted, base) > 1e-2  # the adapter matters
    assert max_diff(adapted, merged) <= 1e-5


def test_lora_linear_matches_its_definition():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = LoRALinear(base, r=2, alpha=6, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    want = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert max_diff(layer(x), want) <= 1e-5
    assert max_diff(layer.merged()(x), want) <= 1e-5
    assert layer.weight is base.weight and not base.weight.requires_grad


def test_bad_lora_arguments(tmp_path):
    _, model = tiny_pair("qwen2", tmp_path)  # tied head: no lm_head module
    with pytest.raises(SlmError, match=r"q_proj.*named \['down', 'gate', 'k', 'o', 'q', 'up', 'v'\]"):
        apply_lora(model, targets=("q_proj",))
    with pytest.raises(SlmError, match="tied"):
        apply_lora(model, targets=("q", "lm_head"))
    with pytest.raises(SlmError, match="rank"):
        apply_lora(model, r=0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # errors change nothing
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, targets=("q",))
    with pytest.raises(SlmError, match="already has LoRA"):
        apply_lora(model, targets=("k",))


# ---------------------------------------------------------------------------- PEFT files


@pytest.mark.parametrize("family", ["llama", "phi", "qwen2", "gemma3"])
def test_peft_reads_our_adapter(family, tmp_path):
    hf, model = tiny_pair(family, tmp_path)
    targets = ALL + (("lm_head",) if family == "llama" else ())
    names = apply_lora(model, r=4, alpha=8, dropout=0.05, targets=targets)
    random_lora_b(model)
    out = save_peft_adapter(model, tmp_path / "adapter", family=model.cfg.family, r=4, alpha=8, dropout=0.05,
                            targets=targets, base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    expected_targets = {
        "llama": ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"],
        "phi": ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"],
    }.get(family, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert config["target_modules"] == expected_targets
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert not list(tmp_path.glob(".adapter*"))  # the temporary folder is gone

    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    loaded = {k for k in peft_model.state_dict() if ".lora_" in k}
    assert len(loaded) == 2 * len(names)
    ids = token_ids(model.cfg.vocab_size)
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        adapted = model(ids)  # the model was in eval mode, so its new dropouts are too
        ours = merge_lora(model)(ids)
    assert max_diff(adapted, ref) <= 1e-4
    assert max_diff(ours, ref) <= 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        assert max_diff(peft_model(input_ids=ids).logits, ref) > 1e-2  # the adapter was really applied


@pytest.mark.parametrize("family,rslora", [("llama", False), ("llama", True), ("phi", False), ("gemma3", False)])
def test_adapter_written_by_peft_loads(family, rslora, tmp_path):
    hf, model = tiny_pair(family, tmp_path)
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", use_rslora=rslora,
                               task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, lora_cfg)
    randomize_peft_b(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft-adapter")

    names = load_peft_adapter(model, tmp_path / "peft-adapter")
    assert len(names) == 2 * len({"llama": ALL, "phi": ("q", "k", "v", "o", "up", "down")}.get(family, ALL))
    assert model.layers[0].attn.q.scaling == pytest.approx(12 / 2 if rslora else 12 / 4)
    ids = token_ids(model.cfg.vocab_size)
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        ours = model(ids)
    assert max_diff(ref, base) > 1e-2
    assert max_diff(ours, ref) <= 1e-4

    # and back out: our copy of peft's adapter holds the same tensors under the same names
    again = save_peft_adapter(model, tmp_path / "again")
    theirs, mine = load_file(tmp_path / "peft-adapter" / "adapter_model.safetensors"), load_file(
        again / "adapter_model.safetensors")
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    assert json.loads((again / "adapter_config.json").read_text())["use_rslora"] is rslora


def test_bad_adapter_folders(tmp_path):
    _, model = tiny_pair("llama", tmp_path)
    with pytest.raises(SlmError, match="adapter_config.json"):
        load_peft_adapter(model, tmp_path / "nowhere")

    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 8, "lora_alpha": 8}))
    with pytest.raises(SlmError, match="IA3"):
        load_peft_adapter(model, ia3)

    # an adapter for a model with a different shape, and one naming a module that does not exist
    _, other = tiny_pair("phi", tmp_path)
    apply_lora(other, r=4, targets=("q", "up"))
    phi_adapter = save_peft_adapter(other, tmp_path / "phi-adapter")
    with pytest.raises(SlmError, match="fc1"):
        load_peft_adapter(model, phi_adapter)
    _, llama = tiny_pair("llama", tmp_path)
    apply_lora(llama, r=4, targets=("q",))
    adapter = save_peft_adapter(llama, tmp_path / "llama-r4")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(SlmError, match=r"shape \(4, 64\), the model needs \(8, 64\)"):
        load_peft_adapter(model, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(SlmError, match="use_dora"):
        load_peft_adapter(model, adapter)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was half-applied

    with pytest.raises(SlmError, match="does not match"):
        save_peft_adapter(llama, tmp_path / "x", r=8)
    with pytest.raises(SlmError, match="no LoRA adapters"):
        save_peft_adapter(model, tmp_path / "x")


# ---------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_adapter_in_peft(smollm2_gguf, tmp_path):
    lm = slmkit.load(smollm2_gguf, quant="none")
    hf_dir = lm.save(tmp_path / "smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)  # A's init: the same adapter on every run
    apply_lora(lm.model, r=8, alpha=16, targets=("q", "v", "down"))
    random_lora_b(lm.model)
    adapter = save_peft_adapter(lm.model, tmp_path / "adapter", base_model_name_or_path=str(hf_dir))
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the green forest."
    ids = torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)[:16]])
    assert ids.shape[1] == 16
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        ours = merge_lora(lm.model)(ids)
    assert max_diff(ref, base) > 0.1
    # fp32 rounding over 30 layers: the base model alone differs from transformers by 7.6e-5 here (logits ~15)
    assert max_diff(ours, ref) <= 2e-4
