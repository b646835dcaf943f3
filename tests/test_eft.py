"""methods/eft.py: the arms' per-token arithmetic (beta 0 is the large base exactly, the formula renormalised per
token), the draft built from a teacher's layers, ROUGE-L, config errors, and the whole experiment end to end on a
tiny family trained from the real corpus and instruction data."""

import json
import math

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.methods import eft
from slmkit.models.decoder import Decoder


def decoder(seed: int, hidden: int = 32, vocab: int = 50) -> Decoder:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def family():
    return {"small_base": decoder(1), "small_ft": decoder(2), "large_base": decoder(3, 64), "large_ft": decoder(4, 64)}


def items(n: int = 3):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (20,), generator=gen).tolist()
        labels = [-100] * 8 + ids[8:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_beta_zero_arm_is_the_large_base_exactly_and_others_follow_the_formula(family):
    arms = {"large base": ("large_base", []), "beta 0": ("large_base", [(0.0, "small_ft", "small_base")]),
            "beta 1": ("large_base", [(1.0, "small_ft", "small_base")])}
    got = eft.assistant_loglik(family, arms, items())
    assert got["beta 0"]["nll"] == got["large base"]["nll"]
    # the formula by hand: log_softmax(lb + (sft - sb)) at each assistant position, from full recomputations
    total, count = 0.0, 0
    for item in items():
        ids = torch.tensor([item["input_ids"]])
        logp = {k: torch.log_softmax(m(ids)[0].float(), -1) for k, m in family.items()}
        for t in range(8, 20):
            scores = logp["large_base"][t - 1] + logp["small_ft"][t - 1] - logp["small_base"][t - 1]
            total -= float(torch.log_softmax(scores, -1)[item["input_ids"][t]])
            count += 1
    assert got["beta 1"]["tokens"] == count
    assert got["beta 1"]["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["beta 1"]["nll"] != got["large base"]["nll"]


def test_recovered_share_per_scale():
    ll = {"small base": {"nll": 5.0}, "small ft": {"nll": 3.0}, "large base": {"nll": 4.0}, "large ft": {"nll": 2.0},
          eft.up_arm(1.0): {"nll": 3.0}, eft.DOWN: {"nll": 4.5}}
    assert eft.recovered(ll, eft.up_arm(1.0)) == pytest.approx(0.5)  # half of large base -> large ft
    assert eft.recovered(ll, eft.DOWN) == pytest.approx(0.25)  # a quarter of small base -> small ft


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is 5 words: P = R = 5/6
    assert eft.rouge_l("The cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert eft.rouge_l("a b c d", "d c b a") == pytest.approx(0.25)  # only one word in order
    assert eft.rouge_l("", "x") == 0.0 and eft.rouge_l("x y", "z") == 0.0


def test_truncated_copy_keeps_the_chosen_layers():
    teacher = decoder(5)
    same, _ = eft.truncated_copy(teacher, [0, 1])
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(same(ids), teacher(ids))
    one, cfg = eft.truncated_copy(teacher, [1])
    assert cfg.n_layers == 1 and torch.equal(one.layers[0].mlp.down.weight, teacher.layers[1].mlp.down.weight)
    with pytest.raises(SlmError, match="draft.layers"):
        eft.truncated_copy(teacher, [0, 2])


@pytest.mark.parametrize("raw,field", [
    ({"eval": {"betas": "one"}}, "eval.betas"),
    ({"draft": {"layers": [3, 1]}}, "draft.layers"),
    ({"speculative": {"gammas": [0]}}, "speculative.gammas"),
    ({"small": {"config": {}}}, "small.config"),
    ({"finetune": {"stepz": 3}}, "stepz"),
    ({"colour": 1}, "colour"),
])
def test_bad_config_names_the_field(raw, field):
    base = {"small": {"config": {"hidden_size": 32}}, "large": {"config": {"hidden_size": 64}}}
    merged = {**base, **raw}
    with pytest.raises(SlmError, match=field):
        eft.config_from_mapping(merged)


TINY = {
    "corpus": ["pretrain_corpus/nltk_inaugural.jsonl"],
    "instructions": "instruction/llamafactory_alpaca_en_demo.json",
    "small": {"config": {"hidden_size": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 64},
              "pretrain_tokens": 16384},
    "large": {"config": {"hidden_size": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 128},
              "pretrain_tokens": 16384},
    "finetune": {"steps": 4, "micro_batch_size": 2, "seq_len": 256},
    "draft": {"layers": [0, 29], "steps": 2, "micro_batch_size": 1},
    "eval": {"heldout_examples": 6, "answers": 2, "max_new_tokens": 8, "betas": [0.0, 1.0]},
    "speculative": {"prompts": 2, "max_new_tokens": 8, "gammas": [2]},
}


def test_the_experiment_end_to_end_on_a_tiny_family(tmp_path, shared_data, smollm2_gguf):
    cfg = eft.config_from_mapping({**TINY, "out_dir": str(tmp_path / "eft"), "data_dir": str(shared_data)})
    report = eft.run(cfg)
    saved = json.loads((tmp_path / "eft" / "results.json").read_text())
    assert saved["complete"] and saved["loglik"] == report["loglik"]
    ll = report["loglik"]
    assert set(ll) == {"small base", "small ft", "large base", "large ft", eft.up_arm(0.0), eft.up_arm(1.0), eft.DOWN}
    assert ll[eft.up_arm(0.0)]["nll"] == ll["large base"]["nll"]  # beta 0: the large base itself
    assert ll["small ft"]["nll"] < ll["small base"]["nll"] and ll["large ft"]["nll"] < ll["large base"]["nll"]
    assert all(math.isfinite(v["nll"]) for v in ll.values())
    assert len(json.loads((tmp_path / "eft" / "data" / "heldout.json").read_text())) == 6
    for key in ("eft_speculative", "smollm2_speculative"):
        spec = report[key]["gammas"]["2"]
        assert spec["identical_outputs"] == 2  # greedy speculative decoding equals plain decoding
    table = (tmp_path / "eft" / "results.md").read_text()
    assert "EFT up-scaled (beta 1)" in table and "identical greedy outputs" in table
