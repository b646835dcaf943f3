"""`slm ul2r` end to end on a tiny Llama pretrained here: the base gains mode tokens and sentinels, both branches
train for the same extra tokens, the table is written; the UL2R branch learns to infill (the causal one cannot)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import slmkit
from slmkit.methods.ul2r import load_config


def slm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def pretrained(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ul2r-base")
    raw = {"task": "pretrain", "out_dir": str(root / "run"),
           "model": {"init": "scratch", "tokenizer_vocab_size": 512,
                     "config": {"hidden_size": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                "intermediate_size": 128, "max_position_embeddings": 256, "tie_word_embeddings": False}},
           "data": {"corpus": [str(shared_data / "pretrain_corpus" / "nltk_inaugural.jsonl")], "seq_len": 64,
                    "val_fraction": 0.1, "workers": 1},
           "optim": {"lr": 3e-3, "warmup_steps": 5},
           "run": {"micro_batch_size": 16, "max_steps": 60, "eval_every": 60, "threads": 2, "progress": False}}
    (root / "pt.yaml").write_text(yaml.safe_dump(raw))
    result = slm("pretrain", str(root / "pt.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run"


def test_ul2r_experiment_end_to_end(pretrained, shared_data, tmp_path):
    config = {"checkpoint": str(pretrained / "model"), "pretraining_tokens": 60 * 16 * 64, "fraction": 1.0,
              "sentinels": 16, "seq_len": 64, "lr": 3e-3, "micro_batch_size": 16, "grad_accum": 1,
              "eval_windows": 16, "infill_items": 40, "infill_span": [1, 1], "infill_context": 12,
              "tasks": ["sst2"], "num_fewshot": [0], "limit": 40, "threads": 2, "out_dir": str(tmp_path / "out")}
    (tmp_path / "ul2r.yaml").write_text(yaml.safe_dump(config))
    result = slm("ul2r", str(tmp_path / "ul2r.yaml"), "--data-dir", str(shared_data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| model |" in result.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    models = results["models"]
    assert set(models) == {"base", "causal", "ul2r", "ul2r, prefix read both ways"}
    base = slmkit.load(tmp_path / "out" / "base")
    assert base.tokenizer.token_to_id("[S2S]") is not None and base.tokenizer.token_to_id("<extra_id_15>") is not None
    assert base.config.vocab_size == slmkit.load(pretrained / "model").config.vocab_size + 19
    # the same windows in both branches: 60 steps each (the UL2R rows are longer: sentinels, padding)
    from slmkit.train.metrics import read_metrics

    steps = {name: read_metrics(tmp_path / "out" / name / "metrics.csv")[-1]["step"] for name in ("causal", "ul2r")}
    assert steps == {"causal": 60, "ul2r": 60}
    assert models["causal"]["infill_exact"] == 0.0  # it never saw a sentinel
    both_ways = models["ul2r, prefix read both ways"]
    # a tiny model after 60 steps fills hardly any span exactly, but the hidden span is already likelier after
    # <extra_id_0> than the causal branch finds it (measured -6.19 against -6.34 nats per token; -5.82 against
    # -6.80 after 240 steps)
    assert both_ways["infill_logprob"] > models["causal"]["infill_logprob"]
    assert 0 < models["ul2r"]["perplexity"] < 2 * models["causal"]["perplexity"]
    assert 0 <= models["ul2r, prefix read both ways"]["sst2 0-shot"] <= 1


def test_bad_ul2r_config_names_the_field(tmp_path):
    (tmp_path / "bad.yaml").write_text("fraction: 2\n")
    with pytest.raises(Exception, match="fraction"):
        load_config(tmp_path / "bad.yaml")
    result = slm("ul2r", str(tmp_path / "bad.yaml"))
    assert result.returncode == 2 and "fraction" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "missing.yaml").write_text(f"checkpoint: {tmp_path / 'nothing'}\n")
    result = slm("ul2r", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "no config.json" in result.stderr
