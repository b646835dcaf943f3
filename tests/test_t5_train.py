"""T5 training: span-corruption noise masks and lengths as T5 computes them, the sentinel round trip, the
seq2seq loss against transformers, T5's init against transformers', and tiny end-to-end ``slm pretrain``
(span_corruption) and ``slm finetune`` (seq2seq) runs whose models transformers opens with the same logits."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slmkit.errors import SlmError
from slmkit.models.t5 import T5, T5Config
from slmkit.api.seq2seq import load_seq2seq
from slmkit.train.corpus import PackedDataset
from slmkit.train.metrics import read_metrics
from slmkit.train.seq2seq_tasks import (SENTINELS, Seq2SeqLoss, SpanCorruptionBatches, compute_input_and_target_lengths,
                                        corrupt, load_pairs, random_spans_noise_mask, sentinel_ids, t5_init_weights)
from slmkit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
           "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
INPUTS_LENGTH = 32
RAW_LENGTH = compute_input_and_target_lengths(INPUTS_LENGTH, 0.15, 3.0)[0]  # 38


def slm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, timeout=600)


def spans(mask: np.ndarray) -> int:
    return int((mask & ~np.concatenate([[False], mask[:-1]])).sum())


# ---------------------------------------------------------------------------------- noise masks
@pytest.mark.parametrize("length", [2, 10, 31, 141, 568])
def test_noise_mask_has_t5s_noise_count_and_span_count_and_starts_clean(length):
    noise = min(max(round(length * 0.15), 1), length - 1)
    for seed in range(5):
        mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (length,)
        assert mask.sum() == noise
        assert spans(mask) == max(round(noise / 3.0), 1)
        assert not mask[0] and mask[-1]  # non-noise first; the interleaving ends with noise
        again = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
        assert np.array_equal(mask, again)
    masks = {random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(s)).tobytes() for s in range(5)}
    assert len(masks) == 5


def test_noise_mask_segmentations_are_uniform():
    """12 tokens at density 0.5: 6 noise tokens in 2 spans, 6 clean ones in 2 runs. Each split of 6 into two
    positive parts (5 ways) is equally likely, so the 25 possible masks appear equally often."""
    rng = np.random.default_rng(123)
    draws = 10_000
    counts = Counter(random_spans_noise_mask(12, 0.5, 3.0, rng).tobytes() for _ in range(draws))
    assert len(counts) == 25
    expected = draws / 25
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 51.2  # the 0.999 quantile of chi-square with 24 degrees of freedom


def test_input_and_target_lengths_match_the_t5_reference_and_corrupt_exactly():
    # values run_t5_mlm_flax.py documents for T5's setting (512 inputs -> 568 raw tokens, 114 targets)
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    sentinels = np.arange(100_000, 101_000)  # enough for the many spans of density 0.5, mean 2
    for inputs_length in (8, 32, 100, 128, 257, 512, 1024):
        for density, mean in ((0.15, 3.0), (0.3, 5.0), (0.5, 2.0)):
            raw, target = compute_input_and_target_lengths(inputs_length, density, mean)
            tokens = np.arange(10, 10 + raw)
            for seed in range(3):
                mask = random_spans_noise_mask(raw, density, mean, np.random.default_rng(seed))
                inputs, targets = corrupt(tokens, mask, sentinels, eos_id=1)
                assert (len(inputs), len(targets)) == (inputs_length, target)
            longer = random_spans_noise_mask(raw + 1, density, mean, np.random.default_rng(0))
            assert len(corrupt(np.arange(raw + 1), longer, sentinels, 1)[0]) > inputs_length  # raw is the longest


def fill_sentinels(inputs, targets, sentinels, eos_id):
    """Put each sentinel's span (read from the target) back in its place in the input."""
    where = {int(s): i for i, s in enumerate(sentinels)}
    assert inputs[-1] == eos_id and targets[-1] == eos_id
    spans_of, current = {}, None
    for t in targets[:-1]:
        if int(t) in where:
            current = where[int(t)]
            spans_of[current] = []
        else:
            spans_of[current].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans_of.pop(where[int(t)]) if int(t) in where else [int(t)])
    assert not spans_of
    return out


def test_filling_each_sentinel_with_its_span_restores_the_window():
    sentinels = np.arange(5000, 5100)
    rng = np.random.default_rng(7)
    for raw in (2, 17, 141, 568):
        tokens = rng.integers(3, 4000, raw)
        mask = random_spans_noise_mask(raw, 0.15, 3.0, np.random.default_rng(raw))
        inputs, targets = corrupt(tokens, mask, sentinels, eos_id=1)
        in_sentinels = [int(t) for t in inputs if t >= 5000]
        assert in_sentinels == list(range(5000, 5000 + spans(mask)))  # <extra_id_0>, <extra_id_1>, ... in order
        assert [int(t) for t in targets if t >= 5000] == in_sentinels and targets[0] == 5000
        assert fill_sentinels(inputs, targets, sentinels, 1) == tokens.tolist()


def test_bad_span_settings_are_named():
    with pytest.raises(SlmError, match="noise density"):
        compute_input_and_target_lengths(128, 1.0, 3.0)
    with pytest.raises(SlmError, match="span length"):
        compute_input_and_target_lengths(128, 0.15, 0.5)
    with pytest.raises(SlmError, match="lower the density"):
        random_spans_noise_mask(10, 0.9, 1.0, np.random.default_rng(0))
    with pytest.raises(SlmError, match="only 2 sentinel"):
        corrupt(np.arange(100), random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(0)), np.arange(2), 1)


# ------------------------------------------------------------------------------ loss and init
def test_seq2seq_loss_equals_transformers_loss(tmp_path):
    cfg = transformers.T5Config(vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path / "t5")
    ours = Seq2SeqLoss(load_seq2seq(tmp_path / "t5").model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 80, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(2, 80, (3, 6), generator=gen)
    labels[0, 4:], labels[2, 2:] = -100, -100
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        total, count = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert int(count) == int((labels != -100).sum()) == 12
    assert float(total / count) == pytest.approx(float(reference), abs=1e-5)


def test_t5_init_matches_transformers_scales():
    """Per-tensor standard deviations of T5's init equal transformers' (to sampling error); the untied head
    is the one documented deviation (d_model^-0.5 instead of 1)."""
    spec = dict(d_model=64, d_kv=16, d_ff=256, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=512, **spec))
    hf_std = {k: float(v.std()) for k, v in hf.state_dict().items()}
    ours = T5(T5Config(vocab_size=512, tie_word_embeddings=False, **spec))
    t5_init_weights(ours)
    from slmkit.models.t5 import t5_to_hf_key

    for name, p in ours.state_dict().items():
        if name == "lm_head.weight":
            assert float(p.std()) == pytest.approx(64 ** -0.5, rel=0.05)
        elif p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert float(p.std()) == pytest.approx(hf_std[t5_to_hf_key(name, ours.cfg)], rel=0.12), name


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def pretrained(shared_data, tmp_path_factory):
    """A tiny T5 pretrained with `slm pretrain` (span corruption) on the inaugural addresses."""
    root = tmp_path_factory.mktemp("t5run")
    raw = {
        "task": "span_corruption", "out_dir": str(root / "run"),
        "model": {"init": "scratch", "tokenizer_vocab_size": 512, "config": TINY_T5},
        "data": {"corpus": ["pretrain_corpus/nltk_inaugural.jsonl"], "seq_len": INPUTS_LENGTH,
                 "val_fraction": 0.1, "workers": 1},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "run": {"micro_batch_size": 8, "max_steps": 8, "eval_every": 4, "save_every": 8, "threads": 1,
                "progress": False},
    }
    config = root / "t5.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = slm("pretrain", str(config), "--data-dir", str(shared_data))
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_pretrained_t5_opens_in_transformers_with_the_same_logits_and_loss(pretrained):
    folder = pretrained / "model"
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    lm = load_seq2seq(folder)
    assert not lm.config.tie_word_embeddings and lm.config.gated
    tok = lm.tokenizer
    assert (tok.pad_id, tok.eos_id, tok.token_to_id("<unk>"), tok.token_to_id("<extra_id_0>")) == (0, 1, 2, 3)
    assert hf.config.decoder_start_token_id == hf.config.pad_token_id == 0 and hf.config.eos_token_id == 1

    val = SpanCorruptionBatches(PackedDataset(pretrained / "data", "val", RAW_LENGTH), 0, sentinel_ids(tok), tok.eos_id,
                                INPUTS_LENGTH, shuffle=False)
    batch = val.batch([0, 1, 2])
    assert batch["input_ids"].shape == (3, INPUTS_LENGTH) and batch["labels"].shape == (3, val.target_length)
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        ours = lm.logits(batch["input_ids"], lm.model.shift_right(batch["labels"]), batch["attention_mask"])
        total, count = Seq2SeqLoss(lm.model)(batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(ours, theirs.logits, atol=1e-4, rtol=1e-4)
    assert float(total / count) == pytest.approx(float(theirs.loss), abs=1e-5)

    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Fellow-Citizens of the Senate <extra_id_0> House of Representatives"
    assert hf_tok(text)["input_ids"] == tok.encode(text) and tok.encode(text)[-1] == 1  # ends with </s>, as T5
    assert tok.encode(text).count(3) == 1  # the sentinel is one token


def test_pretraining_logs_a_falling_validation_loss(pretrained):
    rows = read_metrics(pretrained / "metrics.csv")
    val = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    assert [s for s, _ in val] == [0, 4, 8]
    assert abs(val[0][1] - math.log(512)) < 1.5  # unit-scale logits at init: the loss starts near ln(vocab)
    assert val[0][1] > val[1][1] > val[2][1]


def test_span_corruption_batches_are_a_function_of_indices_and_seed(pretrained):
    tok = Tokenizer.from_hf_dir(pretrained / "model")
    sentinels = sentinel_ids(tok)

    def source(seed):
        return SpanCorruptionBatches(PackedDataset(pretrained / "data", "train", RAW_LENGTH), seed, sentinels, 1,
                                     INPUTS_LENGTH)

    a, b = source(0).batch([5, 900, 17]), source(0).batch([5, 900, 17])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], source(1).batch([5, 900, 17])["input_ids"])
    window, inputs, targets = source(0).example(900)
    assert fill_sentinels(inputs, targets, sentinels, 1) == window.tolist()
    assert torch.equal(a["input_ids"][1], torch.from_numpy(inputs)) and torch.equal(a["labels"][1],
                                                                                    torch.from_numpy(targets))


def test_sentinels_must_be_in_the_tokenizer(pretrained, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    plain = Tokenizer(Backend(WordLevel({"<pad>": 0, "</s>": 1}, unk_token="<pad>")), {"eos_token": "</s>"})
    with pytest.raises(SlmError, match="lacks the sentinel tokens.*<extra_id_0>"):
        sentinel_ids(plain)
    assert sentinel_ids(Tokenizer.from_hf_dir(pretrained / "model")).tolist() == list(range(3, 103))
    assert SENTINELS[99] == "<extra_id_99>"


def rte_records(shared_data, path: Path, n: int) -> Path:
    lines = (shared_data / "rte" / "train.jsonl").read_text().splitlines()[:n]
    with path.open("w") as f:
        for line in lines:
            r = json.loads(line)
            f.write(json.dumps({"source": f"rte premise: {r['premise']} hypothesis: {r['hypothesis']}",
                                "answer": r["label"]}) + "\n")
    return path


def test_seq2seq_finetune_learns_and_saves_a_transformers_model(pretrained, shared_data, tmp_path):
    data = rte_records(shared_data, tmp_path / "rte.jsonl", 64)
    raw = {
        "task": "seq2seq", "out_dir": str(tmp_path / "ft"),
        "model": {"init": str(pretrained / "model")},
        "data": {"train_file": str(data), "input_field": "source", "target_field": "answer", "seq_len": 48,
                 "target_len": 8, "val_fraction": 0.25},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "schedule": "constant"},
        "run": {"micro_batch_size": 8, "max_steps": 10, "eval_every": 5, "save_every": 10, "threads": 1,
                "progress": False},
    }
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = slm("finetune", str(config))
    assert result.returncode == 0, result.stderr
    assert "cut to data.seq_len=48" in result.stderr  # RTE premises are longer than 48 tokens
    val = [r["val_loss"] for r in read_metrics(tmp_path / "ft" / "metrics.csv") if r["val_loss"] is not None]
    assert len(val) == 3 and val[-1] < val[0] - 1.0  # "entailment" / "not_entailment" are quickly learned

    folder = tmp_path / "ft" / "model"
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    lm = load_seq2seq(folder)
    pairs, cut = load_pairs(data, lm.tokenizer, "source", "answer", max_input=48, max_target=8)
    assert cut > 0 and all(len(s) <= 48 and s[-1] == 1 and t[-1] == 1 for s, t in pairs)
    source, target = pairs[0]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([source]), labels=torch.tensor([target]))
        total, count = Seq2SeqLoss(lm.model)(torch.tensor([source]), torch.tensor([target]))
    assert float(total / count) == pytest.approx(float(theirs.loss), abs=1e-5)


def test_seq2seq_data_errors_name_the_record(pretrained, tmp_path):
    tok = Tokenizer.from_hf_dir(pretrained / "model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n\n{"input": "c"}\n')
    with pytest.raises(SlmError, match=r"bad.jsonl:3: no field 'target'"):
        load_pairs(bad, tok)
    bad.write_text('{"input": "a", "target": 3}\n')
    with pytest.raises(SlmError, match="'target' is int, not a string"):
        load_pairs(bad, tok)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": "seq2seq", "model": {"init": str(pretrained / "model")},
                                      "run": {"max_steps": 1}}))
    result = slm("pretrain", str(config))
    assert result.returncode == 2 and "runs tasks pretrain, span_corruption" in result.stderr
