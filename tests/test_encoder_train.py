"""Encoder training: RoBERTa's dynamic 80/10/10 masking, the MLM and classification losses against
transformers' RobertaForMaskedLM / RobertaForSequenceClassification, labelled-file reading, and `slm pretrain`
(task mlm) -> `slm finetune` (task classify) -> `slm eval` end to end on real text, with the saved models
opened by transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slmkit.errors import SlmError
from slmkit.models.encoder import EncoderConfig, load_encoder_state
from slmkit.train.encoder_tasks import (ClassificationLoss, ClassifyBatches, MaskedLMLoss, MLMBatches,
                                        label_index, mask_tokens, read_labelled)

transformers = pytest.importorskip("transformers")

SPECIALS = [0, 1, 2, 3, 4]
TINY = {"family": "roberta", "hidden_size": 32, "n_layers": 2, "n_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 66}


def slm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------------------ masking
def test_mask_tokens_follows_the_15_percent_80_10_10_recipe():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, 400_000)
    ids[::7] = rng.choice(SPECIALS, len(ids[::7]))  # specials scattered through the text
    inputs, labels = mask_tokens(ids, np.random.default_rng([3, 11]), 1000, 4, SPECIALS)
    special = np.isin(ids, SPECIALS)
    chosen = labels != -100
    assert not chosen[special].any() and np.array_equal(inputs[special], ids[special]), "a special token was touched"
    assert np.array_equal(labels[chosen], ids[chosen]) and np.array_equal(inputs[~chosen], ids[~chosen])
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.003
    masked = inputs[chosen] == 4
    unchanged = inputs[chosen] == ids[chosen]
    randomised = ~masked & ~unchanged
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(randomised.mean() - 0.1) < 0.01
    assert abs(unchanged.mean() - 0.1) < 0.01  # (a random draw equal to the original: 1 in 995, inside this)
    drawn = inputs[chosen][randomised]
    assert not np.isin(drawn, SPECIALS).any() and drawn.min() >= 5 and drawn.max() < 1000
    assert len(np.unique(drawn)) > 900, "random replacements should cover the vocabulary"


def test_the_same_seed_and_sample_give_the_same_mask_and_other_samples_differ():
    ids = np.arange(5, 505)
    a = mask_tokens(ids, np.random.default_rng([0, 0, 7]), 600, 4, SPECIALS)
    b = mask_tokens(ids, np.random.default_rng([0, 0, 7]), 600, 4, SPECIALS)
    c = mask_tokens(ids, np.random.default_rng([0, 0, 8]), 600, 4, SPECIALS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    with pytest.raises(SlmError, match="mask probability"):
        mask_tokens(ids, np.random.default_rng(0), 600, 4, SPECIALS, prob=1.5)


class _Windows:
    """A PackedDataset stand-in: windows of consecutive ids, an EOS (id 9) every 10 tokens."""

    def __init__(self, n: int, seq_len: int):
        self.num_windows, self.seq_len, self.eos_id = n, seq_len, 9

    def __len__(self):
        return self.num_windows

    def window(self, i: int) -> np.ndarray:
        w = np.arange(i * self.seq_len, i * self.seq_len + self.seq_len + 1) % 50 + 10
        w[::10] = self.eos_id
        return w

    def sample(self, k: int, seed: int) -> np.ndarray:
        epoch, position = divmod(k, self.num_windows)
        return self.window(int(np.random.default_rng([seed, epoch]).permutation(self.num_windows)[position]))


def test_mlm_batches_are_full_sentence_rows_masked_afresh_each_epoch_and_identically_on_resume():
    data = _Windows(8, 30)
    source = MLMBatches(data, seed=5, cls_id=0, sep_id=2, mask_id=4, vocab_size=60, special_ids=SPECIALS)
    batch = source.batch([0, 1, 2])
    assert batch["input_ids"].shape == (3, 32) and batch["labels"].shape == (3, 32)
    assert (batch["input_ids"][:, 0] == 0).all() and (batch["input_ids"][:, -1] == 2).all()
    rows = np.stack([source.row(k) for k in (0, 1, 2)])
    assert not (rows == 9).any() and (rows[:, 1:-1] == 2).sum() == 3 * 3, "document EOS ids must become </s>"
    assert not (batch["labels"][torch.from_numpy(rows == 2)] != -100).any(), "a separator was masked"
    again = MLMBatches(data, seed=5, cls_id=0, sep_id=2, mask_id=4, vocab_size=60, special_ids=SPECIALS)
    assert all(torch.equal(batch[key], again.batch([0, 1, 2])[key]) for key in batch)  # a resumed run
    # the same window in the next epoch: same text, a new mask
    k2 = next(k for k in range(8, 16) if np.array_equal(source.row(k), source.row(0)))
    assert not torch.equal(source.batch([k2])["labels"], batch["labels"][:1])
    val = MLMBatches(data, seed=5, cls_id=0, sep_id=2, mask_id=4, vocab_size=60, special_ids=SPECIALS, shuffle=False)
    assert np.array_equal(val.row(3)[1:-1], np.where(data.window(3)[:-1] == 9, 2, data.window(3)[:-1]))


# ------------------------------------------------------------------------------------------- loss parity
def _tiny_roberta(cls_name: str, **extra):
    cfg = transformers.RobertaConfig(vocab_size=70, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
                                     layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = load_encoder_state(EncoderConfig.from_hf(cfg.to_dict()), hf.state_dict(), architectures=[cls_name])
    return hf, ours


def _padded_batch(rng: np.random.Generator):
    lengths = [20, 13, 7, 20]
    ids = torch.full((4, 20), 1)
    mask = torch.zeros((4, 20), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.from_numpy(np.concatenate([[0], rng.integers(5, 70, n - 2), [2]]))
        mask[row, :n] = 1
    return ids, mask


def test_masked_lm_loss_equals_transformers():
    hf, ours = _tiny_roberta("RobertaForMaskedLM")
    rng = np.random.default_rng(1)
    ids, mask = _padded_batch(rng)
    inputs, labels = mask_tokens(ids.numpy(), rng, 70, 4, SPECIALS, prob=0.3)
    inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
    with torch.no_grad():
        want = hf(input_ids=inputs, attention_mask=mask, labels=labels).loss
        total, count = MaskedLMLoss(ours)(inputs, labels, attention_mask=mask)
    assert count == (labels != -100).sum() > 10
    assert abs(total / count - want).item() < 1e-5


def test_classification_loss_equals_transformers():
    hf, ours = _tiny_roberta("RobertaForSequenceClassification", num_labels=3)
    ids, mask = _padded_batch(np.random.default_rng(2))
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        total, count = ClassificationLoss(ours)(ids, labels, attention_mask=mask)
    assert count == 4 and abs(total / count - want).item() < 1e-5


def test_a_bert_pooler_becomes_the_classifier_dense_layer_as_in_transformers(tmp_path):
    from slmkit.train.config import config_from_dict
    from slmkit.train.encoder_tasks import with_heads

    cfg = transformers.BertConfig(vocab_size=70, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=3).eval()
    body = transformers.BertModel.from_pretrained(tmp_path / "bert")
    base = load_encoder_state(EncoderConfig.from_hf(cfg.to_dict()), body.state_dict(), architectures=["BertModel"])
    assert base.pooler is not None
    train_cfg = config_from_dict({"task": "classify", "model": {"num_labels": 3}, "run": {"max_steps": 1}})
    ours = with_heads(base, ("classifier",), train_cfg).eval()
    assert ours.cfg.num_labels == 3 and ours.pooler is None and ours.mlm_head is None
    ours.classifier.out.load_state_dict(hf.classifier.state_dict())  # the one freshly drawn layer
    ids, mask = _padded_batch(np.random.default_rng(3))
    with torch.no_grad():
        assert (ours.classify(ids, mask) - hf(input_ids=ids, attention_mask=mask).logits).abs().max() < 1e-5


# --------------------------------------------------------------------------------------- labelled files
def test_reads_glue_tsv_jsonl_and_names_bad_labels(shared_data, tmp_path):
    dev = read_labelled(shared_data / "sst2" / "glue_dev.tsv")
    assert len(dev) == 872 and dev[0][:2] == ("it 's a charming and often affecting journey .", "1")
    assert {raw for _, raw, _ in dev} == {"0", "1"}
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "good", "label": "positive"}\n\n{"text": "bad", "label": 0}\n')
    rows = read_labelled(jsonl)
    assert [label_index(raw, 2, ["negative", "positive"], where) for _, raw, where in rows] == [1, 0]
    with pytest.raises(SlmError, match=r"x\.jsonl:1: label 'positive' is not an integer"):
        label_index(rows[0][1], 2, [], rows[0][2])
    with pytest.raises(SlmError, match="outside 0..1"):
        label_index("2", 2, [], "here")
    with pytest.raises(SlmError, match="no field 'sentence'"):
        read_labelled(jsonl, text_column="sentence")
    batches = ClassifyBatches([([0, 5, 2], 1), ([0, 5, 6, 7, 2], 0)], seed=0, pad_id=1)
    b = batches.batch([0, 1])
    assert b["input_ids"].shape == (2, 5) and int(b["tokens"]) == 8 and b["attention_mask"].sum() == 8
    assert sorted(b["labels"].tolist()) == [0, 1]


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pretrained(shared_data, tmp_path_factory):
    """`slm pretrain` (task mlm) of a tiny RoBERTa on the inaugural addresses, vocabulary 512."""
    root = tmp_path_factory.mktemp("mlm")
    config = {
        "task": "mlm", "out_dir": str(root / "run"),
        "model": {"init": "scratch", "tokenizer_vocab_size": 512, "config": TINY},
        "data": {"corpus": ["pretrain_corpus/nltk_inaugural.jsonl"], "seq_len": 64, "val_fraction": 0.1,
                 "workers": 1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01,
                  "warmup_steps": 2},
        "run": {"micro_batch_size": 8, "max_steps": 6, "eval_every": 3, "eval_batches": 2, "threads": 1,
                "precision": "bf16", "progress": False},
    }
    (root / "mlm.yaml").write_text(yaml.safe_dump(config))
    result = slm("pretrain", str(root / "mlm.yaml"), "--data-dir", str(shared_data))
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_pretrained_mlm_opens_in_transformers_with_the_same_logits(pretrained, shared_data):
    from slmkit.api.encoder import load_encoder
    from slmkit.train.metrics import read_metrics

    rows = read_metrics(pretrained / "metrics.csv")
    assert rows[-1]["step"] == 6 and rows[-1]["val_loss"] > 0 and all(r["loss"] > 0 for r in rows[1:])
    folder = pretrained / "model"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]
    lm = load_encoder(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.RobertaForMaskedLM.from_pretrained(folder).eval()
    text = ["We the people of the United States, in order to form a <mask> union", "Fellow citizens"]
    enc = hf_tok(text, padding=True, return_tensors="pt")
    mine = lm.encode(text)
    assert torch.equal(enc["input_ids"], mine["input_ids"]) and torch.equal(enc["attention_mask"],
                                                                           mine["attention_mask"])
    assert enc["input_ids"][0, 0] == hf_tok.cls_token_id == 0 and hf_tok.mask_token_id in enc["input_ids"][0]
    assert hf_tok.pad_token_id == hf.config.pad_token_id == 1
    with torch.no_grad():
        want = hf(**enc).logits
        got = lm.model.mlm_logits(mine["input_ids"], mine["attention_mask"])
    assert (got - want).abs().max().item() < 1e-4
    refused = slm("eval", str(folder), "--tasks", "sst2", "--limit", "4", "--data-dir", str(shared_data))
    assert refused.returncode == 2 and "no classification head" in refused.stderr


def _sst2_subset(shared_data: Path, folder: Path) -> tuple[Path, Path]:
    lines = (shared_data / "sst2" / "glue_train_part1.tsv").read_text().splitlines()
    dev = (shared_data / "sst2" / "glue_dev.tsv").read_text().splitlines()
    (folder / "train.tsv").write_text("\n".join(lines[:201]) + "\n")
    (folder / "dev.tsv").write_text("\n".join(dev[:81]) + "\n")
    return folder / "train.tsv", folder / "dev.tsv"


def _classify_config(path: Path, init: str, out: Path, train: Path, dev: Path, **model) -> Path:
    config = {
        "task": "classify", "out_dir": str(out),
        "model": {"init": init, "num_labels": 2, "labels": ["negative", "positive"], **model},
        "data": {"train_file": [str(train)], "val_file": str(dev), "seq_len": 64},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "weight_decay": 0.1},
        "run": {"micro_batch_size": 16, "max_steps": 6, "eval_every": 3, "eval_batches": 6, "threads": 1,
                "progress": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _hf_accuracy(folder: Path, dev: Path) -> tuple[float, torch.Tensor]:
    rows = read_labelled(dev)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.RobertaForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = hf(**tok([t for t, _, _ in rows], padding=True, truncation=True, return_tensors="pt")).logits
    gold = torch.tensor([int(raw) for _, raw, _ in rows])
    return (logits.argmax(-1) == gold).float().mean().item(), logits


def test_finetuned_classifier_opens_in_transformers_and_reports_its_accuracy(pretrained, shared_data, tmp_path):
    from slmkit.api.encoder import load_encoder

    train, dev = _sst2_subset(shared_data, tmp_path)
    cfg = _classify_config(tmp_path / "cls.yaml", str(pretrained / "model"), tmp_path / "cls", train, dev)
    result = slm("finetune", str(cfg))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "cls" / "model"
    hf_cfg = json.loads((folder / "config.json").read_text())
    assert hf_cfg["architectures"] == ["RobertaForSequenceClassification"]
    assert hf_cfg["id2label"] == {"0": "negative", "1": "positive"}
    accuracy, hf_logits = _hf_accuracy(folder, dev)
    report = json.loads((tmp_path / "cls" / "eval.json").read_text())
    assert report["examples"] == 80 and report["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    lm = load_encoder(folder)
    assert (lm.classify([t for t, _, _ in read_labelled(dev)]) - hf_logits).abs().max().item() < 1e-4
    # the encoder body is the pretrained one, moved by fine-tuning; the MLM head is gone
    pre = load_encoder(pretrained / "model").model
    assert lm.model.mlm_head is None and lm.model.classifier is not None
    assert not torch.equal(pre.encoder.layers[0].attn.q.weight, lm.model.encoder.layers[0].attn.q.weight)

    # `slm eval` scores SST-2 with the classification head: the same accuracy transformers gives
    out = tmp_path / "eval.json"
    result = slm("eval", str(folder), "--tasks", "sst2", "--limit", "80", "--data-dir", str(shared_data),
                 "--output", str(out))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(out.read_text())
    assert evaluated["results"]["sst2"]["n"] == 80  # the first 80 dev sentences: the val file above
    assert evaluated["results"]["sst2"]["acc"] == pytest.approx(accuracy, abs=1e-9)
    assert evaluated["samples"]["sst2"][0]["prompt"] == read_labelled(dev)[0][0]


def test_random_init_classifier_and_pretrain_refuses_a_classify_config(pretrained, shared_data, tmp_path):
    train, dev = _sst2_subset(shared_data, tmp_path)
    cfg = _classify_config(tmp_path / "rand.yaml", "scratch", tmp_path / "rand", train, dev,
                           tokenizer=str(pretrained / "tokenizer"), config=TINY)
    refused = slm("pretrain", str(cfg))
    assert refused.returncode == 2 and "slm finetune" in refused.stderr and "Traceback" not in refused.stderr
    result = slm("finetune", str(cfg))
    assert result.returncode == 0, result.stderr
    accuracy, _ = _hf_accuracy(tmp_path / "rand" / "model", dev)
    assert json.loads((tmp_path / "rand" / "eval.json").read_text())["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    no_tokenizer = _classify_config(tmp_path / "bad.yaml", "scratch", tmp_path / "bad", train, dev, config=TINY)
    result = slm("finetune", str(no_tokenizer))
    assert result.returncode == 2 and "needs model.tokenizer" in result.stderr
