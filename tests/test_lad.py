"""methods/lad: token pruning keeps exactly the configured counts and really shortens the tensors (FLOPs
checked against torch's own counter), the loss terms against their formulas on fixed tensors, the LAT
sampling rule, the length search, the data readers, config errors, and the experiment end to end on a tiny
config with the real MiniLM weights and the real SST-2 / AG News files."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from slmkit.errors import SlmError
from slmkit.methods import lad
from slmkit.methods.lad.data import read_examples
from slmkit.methods.lad.losses import FeatureQueue, gather_scores, info_nce, score_mse
from slmkit.methods.lad.objectives import GeneralDistillLoss, TaskDistillLoss, sample_ratios, smallest_ratios
from slmkit.methods.lad.pruning import (check_ratios, classify_pruned, encoder_flops, pruned_forward,
                                        token_budget)
from slmkit.methods.lad.search import best_within, evolutionary_search, pareto_front
from slmkit.methods.lad.tasks import student_from_layers
from slmkit.models.encoder import EncoderConfig, EncoderModel


def tiny_encoder(seed: int = 0, layers: int = 3, heads=("classifier",)) -> EncoderModel:
    cfg = EncoderConfig(family="bert", vocab_size=60, hidden_size=32, n_layers=layers, n_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(seed)
    model = EncoderModel(cfg, heads)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def batch(lengths=(12, 7, 3), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, 60, (n,), generator=gen)
        ids[row, 0] = 1  # [CLS]
        mask[row, :n] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ pruning
def test_no_pruning_is_the_encoder_itself():
    model = tiny_encoder()
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, mask)
        out = pruned_forward(model, ids, mask, None)
        assert torch.allclose(out.hidden[mask.bool()], ref[mask.bool()], atol=1e-5)
        assert torch.allclose(classify_pruned(model, ids, mask, [1.0] * 3), model.classify(ids, mask), atol=1e-5)


def test_pruning_keeps_exactly_the_configured_counts_and_cls_first():
    model = tiny_encoder()
    lengths = (12, 7, 3)
    ids, mask = batch(lengths)
    ratios = [0.8, 0.5, 0.25]
    with torch.no_grad():
        out = pruned_forward(model, ids, mask, ratios, collect=True)
    previous = list(lengths)
    for layer, r in enumerate(ratios):
        expected = [min(p, max(1, math.ceil(r * n))) for p, n in zip(previous, lengths)]
        assert out.kept[layer].tolist() == expected
        previous = expected
    assert out.mask.sum(1).tolist() == previous
    assert out.hidden.shape[1] == max(previous)  # the tensors really shrink
    assert out.index[:, 0].tolist() == [0, 0, 0]  # [CLS] stays, in slot 0
    for row in range(3):  # kept positions are real tokens, in order, none twice
        kept = out.index[row][out.mask[row]].tolist()
        assert kept == sorted(set(kept)) and max(kept) < lengths[row]


def test_the_kept_tokens_are_those_that_receive_most_attention():
    model = tiny_encoder(1)
    ids, mask = batch((10,), seed=3)
    layer = model.encoder.layers[0]
    with torch.no_grad():
        x = model.encoder.embeddings(ids)
        q, k = (p(x).view(1, 10, 4, 8).transpose(1, 2) for p in (layer.attn.q, layer.attn.k))
        received = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).softmax(-1).sum(dim=(1, 2))[0]
        received[0] = float("inf")
        expected = sorted(received.topk(4).indices.tolist())
        out = pruned_forward(model, ids, mask, [0.4, 0.4, 0.4])
    assert out.index[0].tolist() == expected


def test_flops_formula_matches_torchs_counter():
    model = tiny_encoder(layers=3)
    ids, mask = batch((20,))
    for ratios in (None, [0.7, 0.5, 0.3], [1.0, 1.0, 0.2]):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pruned_forward(model, ids, mask, ratios)
        # the counter also sees the embedding-free matmuls only; one row, so counts equal the formula's
        assert counter.get_total_flops() == encoder_flops(model.cfg, 20, ratios)
    assert encoder_flops(model.cfg, 20, [0.5] * 3) < 0.6 * encoder_flops(model.cfg, 20)


@pytest.mark.parametrize("ratios", [[1.0, 0.5], [0.5, 0.7, 0.2], [0.0, 0.0, 0.0], [1.2, 1.0, 1.0]])
def test_bad_length_configurations_are_refused(ratios):
    with pytest.raises(SlmError):
        check_ratios(ratios, 3)


# ------------------------------------------------------------------------------------------------ losses
def test_info_nce_is_minus_log_of_the_positives_share():
    gen = torch.Generator().manual_seed(0)
    s, t, queue = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen)
    queue = F.normalize(queue, dim=-1)
    expected = 0.0
    for i in range(3):
        si, ti = s[i] / s[i].norm(), t[i] / t[i].norm()
        pos = math.exp(float(si @ ti) / 0.07)
        neg = sum(math.exp(float(si @ q) / 0.07) for q in queue)
        expected += -math.log(pos / (pos + neg))
    assert info_nce(s, t, queue, 0.07).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(s, t, None).item() == pytest.approx(0.0, abs=1e-6)


def test_score_mse_counts_only_the_valid_pairs():
    s = torch.arange(16.0).view(1, 2, 2, 4)
    t = torch.zeros(1, 2, 2, 4)
    pairs = torch.tensor([[[True, True, False, False], [False, False, False, False]]])
    # heads 0 and 1 at (0, 0) and (0, 1): values 0, 1, 8, 9
    assert score_mse(s, t, pairs).item() == pytest.approx((0 + 1 + 64 + 81) / 4)


def test_the_queue_is_a_ring_of_the_latest_normalised_vectors():
    queue = FeatureQueue(3, 2)
    assert queue.negatives().shape == (0, 2)
    queue.push(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    queue.push(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert queue.negatives().tolist() == [[0.0, -1.0], [0.0, 1.0], [1.0, 0.0]]
    copy = queue.negatives()
    queue.push(torch.tensor([[5.0, 0.0]]))
    assert copy.tolist() == [[0.0, -1.0], [0.0, 1.0], [1.0, 0.0]]  # a copy: a later push does not touch it


def test_gather_scores_takes_the_block_at_the_kept_positions():
    scores = torch.arange(2 * 1 * 4 * 4.0).view(2, 1, 4, 4)
    index = torch.tensor([[0, 2], [1, 3]])
    block = gather_scores(scores, index)
    assert block[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    assert block[1, 0].tolist() == [[21.0, 23.0], [29.0, 31.0]]


def test_lat_sampling_rule_and_the_smallest_model():
    rng = random.Random(0)
    for _ in range(200):
        bound = rng.choice([0.1, 0.4, 0.7])
        r = sample_ratios(4, bound, rng)
        previous = 1.0
        for i, value in enumerate(r[:-1]):
            assert previous * (1 - bound) - 1e-12 <= value <= previous
            previous = value
        assert r[-1] == r[-2]  # the last layer keeps what the one before kept
    assert smallest_ratios(4, 0.5) == [0.5, 0.25, 0.125, 0.125]


def test_general_loss_is_full_plus_weighted_align_and_recon_and_trains_the_student_only():
    teacher = tiny_encoder(2, layers=3, heads=()).requires_grad_(False)
    student = student_from_layers(teacher, [0, 2])
    ids, mask = batch((12, 9, 6, 10))
    kwargs = dict(queue_size=64, mask_id=3, seed=5)
    plain = GeneralDistillLoss(student, teacher, "plain", **kwargs)
    lad_0 = GeneralDistillLoss(student, teacher, "lad", weight=0.0, **kwargs)
    lad_1 = GeneralDistillLoss(student, teacher, "lad", weight=1.0, **kwargs)
    for obj in (lad_0, lad_1):
        obj.dense_last.load_state_dict(plain.dense_last.state_dict())
    full = plain(ids, mask)[0]
    assert lad_0(ids, mask)[0].item() == pytest.approx(full.item(), rel=1e-5)
    loss, rows = lad_1(ids, mask)
    assert rows.item() == 4 and loss.item() > full.item()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.encoder.layers[0].attn.q.weight.grad.abs().sum() > 0
    assert lad_1.dense_recon.weight.grad.abs().sum() > 0  # the reconstruction path reaches the student
    assert lad_1.queue.filled == lad_1.recon_queue.filled == int(mask.sum())  # every real token, once


def test_task_loss_plain_is_kd_plus_ce_and_lad_averages_the_sub_models():
    teacher = tiny_encoder(3)
    student = tiny_encoder(4, layers=2)
    ids, mask = batch((12, 9, 6, 10))
    labels = torch.tensor([0, 2, 1, 1])
    plain = TaskDistillLoss(student, teacher, "plain")
    loss, rows = plain(ids, mask, labels)
    s, t = student.classify(ids, mask), teacher.classify(ids, mask)
    kd = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    assert (loss / rows).item() == pytest.approx((kd + F.cross_entropy(s, labels)).item(), rel=1e-5)
    lad_loss, _ = TaskDistillLoss(student, teacher, "lad", sub_models=2, queue_size=8)(ids, mask, labels)
    assert torch.isfinite(lad_loss) and lad_loss.item() != pytest.approx(loss.item())


# ------------------------------------------------------------------------------------------------ search
def test_pareto_front_and_best_within():
    points = {(1.0, 1.0): 0.9, (0.5, 0.5): 0.85, (0.6, 0.6): 0.80, (0.3, 0.2): 0.7, (0.3, 0.3): 0.65}
    assert pareto_front(points) == [(0.3, 0.2), (0.5, 0.5), (1.0, 1.0)]
    assert best_within(points, 0.6) == (0.5, 0.5)
    assert best_within(points, 0.1) is None


def test_evolutionary_search_finds_the_best_schedule_of_a_known_objective():
    # accuracy falls with the tokens the *first* layer drops, not the others: the search should learn to
    # keep layer 0 and prune later layers
    def accuracy(config):
        return 1.0 - (1.0 - config[0]) - 0.01 * sum(config)

    points = evolutionary_search(accuracy, 3, iterations=8, mutations=12, crossovers=6, seed=0)
    assert all(list(c) == sorted(c, reverse=True) for c in points)  # never increasing
    best = best_within(points, 0.5)
    assert best is not None and token_budget(best) <= 0.5 + 1e-9
    assert best[0] > best[-1] and points[best] > accuracy((0.5, 0.5, 0.5))


def test_paired_difference_is_the_accuracy_gap_with_a_bootstrap_interval():
    from slmkit.methods.lad.experiment import paired_difference

    a = torch.tensor([1.0] * 60 + [0.0] * 40)
    b = torch.tensor([1.0] * 50 + [0.0] * 50)
    d = paired_difference(a, b, seed=0)
    assert d["difference"] == pytest.approx(0.10)
    assert 0.0 < d["low"] < 0.10 < d["high"] < 0.2  # ten examples differ, all in a's favour
    same = paired_difference(a, a, seed=0)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}


# ------------------------------------------------------------------------------------------------ data
def test_readers_take_each_benchmark_format(tmp_path):
    files = {
        "glue.tsv": "sentence\tlabel\na fine film .\t1\nawful\t0\n",
        "stsa.train": "1 a fine film .\n0 awful\n",
        "ag.csv": 'Class Index,Title,Description\n3,Stocks up,"Markets rose\\today"\n1,War,Talks fail\n',
        "ag.tsv": "Markets rose today\tBusiness\nTalks fail\tWorld\n",
        "any.jsonl": '{"text": "a fine film .", "label": 1}\n{"text": "awful", "label": 0}\n',
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    assert read_examples(tmp_path / "glue.tsv") == [("a fine film .", 1), ("awful", 0)]
    assert read_examples(tmp_path / "stsa.train") == [("a fine film .", 1), ("awful", 0)]
    assert read_examples(tmp_path / "ag.csv") == [("Stocks up. Markets rose today", 2), ("War. Talks fail", 0)]
    assert read_examples(tmp_path / "ag.tsv") == [("Markets rose today", 2), ("Talks fail", 0)]
    assert read_examples(tmp_path / "any.jsonl") == [("a fine film .", 1), ("awful", 0)]
    (tmp_path / "bad.txt").write_text("just some words\n")
    with pytest.raises(SlmError, match="bad.txt"):
        read_examples(tmp_path / "bad.txt")


def test_readers_on_the_real_files(shared_data):
    dev = read_examples(shared_data / "sst2" / "glue_dev.tsv")
    test = read_examples(shared_data / "agnews" / "test.csv")
    train = read_examples(shared_data / "agnews" / "alps_train_heldout_10k.tsv")
    assert len(dev) == 872 and {y for _, y in dev} == {0, 1}
    assert len(test) == 7600 and [sum(y == c for _, y in test) for c in range(4)] == [1900] * 4
    assert len(train) == 10001 and {y for _, y in train} == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------------ config
BASE = {"datasets": {"sst2": {"train": "a.tsv", "test": "b.tsv", "labels": 2}}}


@pytest.mark.parametrize("raw,field", [
    ({}, "datasets"),
    ({**BASE, "general": {"steps": 0}}, "general.steps"),
    ({**BASE, "budgets": [1.5]}, "budgets"),
    ({"datasets": {"sst2": {"train": "a.tsv", "labels": 2}}}, "datasets.sst2"),
    ({**BASE, "distill": {"sub_modles": 2}}, "sub_modles"),
])
def test_bad_config_names_the_field(raw, field):
    with pytest.raises(SlmError, match=field.replace(".", r"\.")):
        lad.config_from_mapping(raw)


def test_student_from_layers_copies_the_chosen_layers():
    teacher = tiny_encoder(5, layers=3, heads=())
    student = student_from_layers(teacher, [0, 2])
    assert student.cfg.n_layers == 2
    assert torch.equal(student.encoder.layers[1].mlp.up.weight, teacher.encoder.layers[2].mlp.up.weight)
    with pytest.raises(SlmError, match="student_layers"):
        student_from_layers(teacher, [2, 1])


# ------------------------------------------------------------------------------------------------ end to end
def test_the_experiment_end_to_end_on_a_tiny_config(tmp_path, shared_data, minilm):
    raw = {
        "out_dir": str(tmp_path / "lad"), "data_dir": str(shared_data), "teacher": str(minilm),
        "corpus": ["pretrain_corpus/nltk_abc_news.jsonl"], "seq_len": 48, "precision": "fp32",
        "budgets": [1.0, 0.5],
        "datasets": {"sst2": {"train": "sst2/stsa.binary.dev", "test": "sst2/glue_dev.tsv", "labels": 2,
                              "search_examples": 32, "train_examples": 48, "test_examples": 40}},
        "general": {"lines": 64, "steps": 2, "micro_batch_size": 16, "seq_len": 32, "student_layers": [0, 5],
                    "queue_size": 64},
        "teacher_ft": {"epochs": 0.5, "micro_batch_size": 16},
        "distill": {"epochs": 0.5, "micro_batch_size": 16},
        "search": {"iterations": 1, "mutations": 3, "crossovers": 2},
        "latency": {"examples": 16, "batch_size": 8, "repeats": 1},
    }
    report = lad.run(lad.config_from_mapping(raw))
    out = tmp_path / "lad"
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and (out / "lad.png").stat().st_size > 0
    assert "| 50 % | LAD |" in (out / "results.md").read_text()
    ds = report["datasets"]["sst2"]
    assert ds["examples"] == {"train": 48, "search": 32, "test": 40}
    for variant in ("lad", "plain"):
        full, half = ds[variant]["budgets"]
        assert full["searched"]["ratios"] == [1.0, 1.0] and full["searched"]["flops"] == pytest.approx(1.0)
        assert half["searched"]["tokens"] <= 0.5 + 1e-9 and half["searched"]["flops"] < 0.75
        assert 0.0 <= half["searched"]["test_accuracy"] <= 1.0
    assert ds["teacher"]["flops_vs_student"] == pytest.approx(3.0, rel=0.01)  # 6 layers against 2
    for d in ds["lad_minus_plain"].values():
        assert d["low"] <= d["difference"] <= d["high"]
    for stage in ("sst2/teacher", "general-lad", "general-plain", "sst2/student-lad", "sst2/student-plain"):
        assert (out / stage / "model" / "config.json").is_file()
    started = (out / "general-lad" / "model" / "config.json").stat().st_mtime
    lad.run(lad.config_from_mapping({**raw, "budgets": [1.0]}))  # a second run reuses every stage
    assert (out / "general-lad" / "model" / "config.json").stat().st_mtime == started
