"""Parity with transformers on tiny random configs: same logits on a left-padded batch."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slmkit.formats.hf import read_hf_config, read_hf_state_dict  # noqa: E402
from slmkit.models.build import build_decoder  # noqa: E402

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=97,
             max_position_embeddings=128)


def tiny_hf_configs():
    return {
        "llama-gqa": transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rms_norm_eps=1e-5,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                              tie_word_embeddings=False),
        "llama-tied": transformers.LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
        "phi": transformers.PhiConfig(**SMALL, num_key_value_heads=4, partial_rotary_factor=0.5),
        "qwen2": transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
        "gemma3": transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=32, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"],
                                                query_pre_attn_scalar=24),
    }


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights and biases included), so nothing passes by being 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def hf_model_and_ours(name: str, tmp_path: Path):
    hf_cfg = tiny_hf_configs()[name]
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    randomize(hf)
    hf.save_pretrained(tmp_path / name)
    folder = tmp_path / name
    cfg = read_hf_config(folder)
    ours = build_decoder(cfg, read_hf_state_dict(folder, cfg.family), source=str(folder))
    return hf.eval(), ours


def padded_batch(vocab: int, lengths=(12, 7, 10), pad_id: int = 0):
    gen = torch.Generator().manual_seed(1)
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), t), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, t - n:] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, t - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("name", list(tiny_hf_configs()))
def test_logits_match_transformers_on_padded_batch(name, tmp_path):
    hf, ours = hf_model_and_ours(name, tmp_path)
    ids, mask, positions = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, positions=positions, key_valid=mask.bool())
    valid = mask.bool()
    diff = (ref[valid] - got[valid]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"
    assert ref[valid].abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("name", list(tiny_hf_configs()))
def test_greedy_continuations_match_transformers(name, tmp_path):
    from slmkit.engine.generate import generate
    from slmkit.engine.sampling import SamplingParams

    hf, ours = hf_model_and_ours(name, tmp_path)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 4, 6)]
    done = generate(ours, None, prompts, SamplingParams(max_new_tokens=12), eos_ids=set())
    for prompt, completion in zip(prompts, done):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert completion.token_ids == ref, f"{name}: batched greedy continuation differs from transformers"


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3"])
def test_chunked_prefill_equals_one_pass(name, tmp_path):
    from slmkit.engine.generate import prefill
    from slmkit.engine.kv_cache import KVCache

    _, ours = hf_model_and_ours(name, tmp_path)
    ids, mask, positions = padded_batch(ours.cfg.vocab_size, lengths=(12, 7, 10))
    whole = ours(ids, positions=positions, key_valid=mask.bool())[:, -1]
    for chunk in (1, 3, 5):
        cache = KVCache(ours.cfg, ids.shape[0], ids.shape[1], torch.float32)
        got = prefill(ours, ids, positions, mask.bool(), cache, chunk=chunk)
        assert (got - whole).abs().max().item() <= 1e-5, f"{name}: chunk {chunk}"


def test_sharded_safetensors_folder_loads(tmp_path):
    """transformers' sharded layout (model.safetensors.index.json + shards) reads like a single file."""
    hf_cfg = tiny_hf_configs()["llama-gqa"]
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    randomize(hf)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    cfg = read_hf_config(tmp_path / "sharded")
    ours = build_decoder(cfg, read_hf_state_dict(tmp_path / "sharded", cfg.family))
    ids = torch.tensor([[5, 9, 3, 44, 7]])
    with torch.no_grad():
        assert (ours(ids) - hf.eval()(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(tiny_hf_configs()))
def test_config_parameter_count_matches_the_model(name, tmp_path):
    hf, ours = hf_model_and_ours(name, tmp_path)
    assert ours.cfg.num_parameters() == sum(p.numel() for p in ours.parameters())
    assert ours.cfg.num_parameters() == hf.num_parameters()


def test_missing_tensor_is_named_on_a_quantized_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from slmkit.errors import ModelFileError
    from slmkit.formats.compact import compact_state

    hf_model_and_ours("llama-gqa", tmp_path)
    folder = tmp_path / "llama-gqa"
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = read_hf_config(folder)
    with pytest.raises(ModelFileError, match="layers.1.mlp.up.weight"):
        compact_state(cfg, read_hf_state_dict(folder, cfg.family), "int8", str(folder))
