"""FLAN instruction-tuning data: the templates read from FLAN's own files render every example of every
source, the OPTIONS suffix is FLAN's, the mixture's proportions follow examples-proportional mixing with
the cap, held-out clusters leave, and zero-shot rank classification picks the option a direct
log-likelihood computation picks."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.methods.flan.mixture import (ALSO_HELD_OUT, TRAIN_SOURCES, MixtureConfig, build_mixture, quotas,
                                         render, trained_sources, usable_templates)
from slmkit.methods.flan.sources import SOURCES, read_source
from slmkit.methods.flan.templates import V1_FILE, V2_FILE, format_options, load_patterns


@pytest.fixture(scope="module")
def patterns(shared_data):
    return load_patterns(shared_data / V1_FILE), load_patterns(shared_data / V2_FILE)


def test_template_files_are_read_as_data(patterns):
    v1, v2 = patterns
    assert len(v1) == 61 and sum(len(t) for t in v1.values()) == 610  # FLAN 2021: 61 datasets x 10
    assert all(len(t) == 10 for t in v1.values())
    assert {"cot_gsm8k", "cot_strategyqa", "cot_creak", "cot_qasc", "cot_ecqa", "cot_sensemaking",
            "stream_aqua"} <= set(v2)
    rte = v1["rte"]
    assert rte[0].input == '{premise}\n\nBased on the paragraph above can we conclude that "{hypothesis}"?\n\n{options_}'
    assert [t.inverted for t in rte] == [False] * 9 + [True]  # "Generate a context and a hypothesis."
    assert rte[9].output == "Context: {premise}\n\nHypothesis: {hypothesis}"


def test_options_suffix_is_flans(patterns):
    assert format_options(["yes", "no"]) == "OPTIONS:\n- yes\n- no"
    example = {"premise": "It rained.", "hypothesis": "The ground is wet.", "options": ["yes", "no"],
               "answer": "yes"}
    assert patterns[0]["rte"][0].render(example) == (
        'It rained.\n\nBased on the paragraph above can we conclude that "The ground is wet."?\n\n'
        "OPTIONS:\n- yes\n- no", "yes")
    text, _ = render(patterns[0]["rte"][0], example, options=False)
    assert text == 'It rained.\n\nBased on the paragraph above can we conclude that "The ground is wet."?'
    with pytest.raises(SlmError, match="needs options"):
        patterns[0]["rte"][0].render({**example, "options": []})


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_template_renders_every_example(patterns, shared_data, name):
    source = SOURCES[name]
    examples = read_source(name, shared_data / source.path)
    templates = usable_templates((patterns[1] if source.cot else patterns[0])[source.templates], examples[0])
    assert len(templates) >= 9, f"{name}: only {len(templates)} templates have the fields of its examples"
    for example in examples:
        if not source.cot:
            assert example["answer"] in example["options"]
        for template in templates:
            source_text, target = template.render(example)
            assert "{" + "options_}" not in source_text and source_text.strip()
            if not template.inverted:
                assert target == example["answer"]
            elif source.cot:
                assert example["chain_of_thought"] in target and example["answer"] in target


def test_mixing_proportions_hold_within_one_percent(shared_data):
    cfg = MixtureConfig(total=20000, cot_rate=0.05, max_rate=3000, cap=30000, seed=3)
    records = build_mixture(cfg, shared_data)
    assert len(records) == 20000
    counts = collections.Counter(r["source"] for r in records)
    trained = [n for n in TRAIN_SOURCES if SOURCES[n].cluster != "entailment"]
    assert set(counts) == set(trained) | set(cfg.cot_sources)  # NLI held out, BoolQ / ARC never trained
    for group, share in ((trained, 0.95), (cfg.cot_sources, 0.05)):
        sizes = {n: min(len(read_source(n, shared_data / SOURCES[n].path)), 30000) for n in group}
        denominator = sum(min(s, 3000) for s in sizes.values())
        for n, size in sizes.items():
            expected = share * min(size, 3000) / denominator
            assert abs(counts[n] / 20000 - expected) < 0.01, (n, counts[n], expected)
    formats = collections.Counter(r["format"] for r in records)
    assert all(abs(formats[f] / 20000 - 0.25) < 0.01 for f in formats)
    templates_used = {(r["source"], r["template"]) for r in records}
    assert len([t for t in templates_used if t[0] == "sst2"]) == 10  # random templates, incl. inverted
    fewshot = next(r for r in records if r["format"] == "fsopt" and r["source"] == "trec")
    assert fewshot["input"].count("\n\n\n") == cfg.fewshot and fewshot["input"].count("OPTIONS:") == 3
    assert fewshot["messages"] == [{"role": "user", "content": fewshot["input"]},
                                   {"role": "assistant", "content": fewshot["target"]}]


def test_fixed_template_arm_and_held_out_clusters(shared_data):
    records = build_mixture(MixtureConfig(total=3000, templates="fixed"), shared_data)
    by_source = collections.defaultdict(set)
    for r in records:
        by_source[r["source"]].add((r["template"], r["format"]))
    assert all(len(v) == 1 and next(iter(v))[1] == "zsopt" for v in by_source.values())
    assert trained_sources(MixtureConfig(held_out=["common_sense"])) == [
        n for n in TRAIN_SOURCES if SOURCES[n].cluster != "common_sense"]
    assert ALSO_HELD_OUT["entailment"] == {"paraphrase"}
    assert sum(quotas({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 100).values()) == 100


def test_evaluation_items_are_left_out_of_the_mixture(shared_data):
    gsm = read_source("cot_gsm8k", shared_data / SOURCES["cot_gsm8k"].path)
    planted = {gsm[0]["question"].strip(), gsm[1]["question"].strip()}
    cfg = MixtureConfig(sources=[], cot_sources=["cot_gsm8k"], cot_rate=1.0, total=8000)
    records = build_mixture(cfg, shared_data, exclude={"cot_gsm8k": planted})
    assert len(records) == 8000 and not any(q in r["input"] for r in records for q in planted)


def test_bad_inputs_name_the_problem(shared_data, tmp_path):
    with pytest.raises(SlmError, match=r"unknown FLAN source\(s\) nope"):
        trained_sources(MixtureConfig(sources=["nope"]))
    bad = tmp_path / "rte.jsonl"
    bad.write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe"}) + "\n")
    with pytest.raises(SlmError, match=r"rte.jsonl, record 1: label 'maybe'"):
        read_source("rte", bad)
    with pytest.raises(SlmError, match="no PATTERNS"):
        (tmp_path / "t.py").write_text("X = 1\n")
        load_patterns(tmp_path / "t.py")
    with pytest.raises(SlmError, match=r"flan.total must be >= 1, got 0"):
        build_mixture(MixtureConfig(total=0), shared_data)
    with pytest.raises(SlmError, match="formats"):
        build_mixture(MixtureConfig(formats={"zs": 1.0}), shared_data)


def test_rank_classification_picks_the_most_likely_option(smollm2_gguf, shared_data):
    """The harness's choice per item equals argmax over options of the summed log-probabilities of the
    option's tokens after the chat-rendered prompt, computed here from the model's logits."""
    from slmkit import load
    from slmkit.methods.flan.zero_shot import evaluate_zero_shot, rank_records, scoring_templates

    lm = load(smollm2_gguf)
    examples = read_source("cb", shared_data / "cb/val.jsonl")[:12]
    template = scoring_templates("cb", examples[0], shared_data)[0]
    wrap = lambda text: lm.chat_prompt([{"role": "user", "content": text}])  # noqa: E731
    right = 0
    for record in rank_records(examples, template, wrap):
        context = lm.tokenizer.encode(record["prompt"].rstrip("\n"), add_special_tokens=False)
        scores = []
        for option in record["choices"]:
            whole = lm.tokenizer.encode(record["prompt"] + option, add_special_tokens=False)
            logprobs = torch.log_softmax(lm.logits(whole)[0], dim=-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == record["gold"]
    got = evaluate_zero_shot(lm, {"cb": shared_data / "cb/val.jsonl"}, shared_data, chat=True, limit=12,
                             max_templates=1, progress=False)
    assert got["cb"]["templates"] == {template.index: right / 12}
