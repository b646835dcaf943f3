"""The evaluation harness end to end on the real SmolLM2 model and the shared data files.

Every task kind runs on a slice; each reported metric is recomputed here from the sample records with
formulas written out in this file; a repeated command gives identical output; prompts are built the
way lm-evaluation-harness builds them.
"""

import json
import math

import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.eval import evaluate, load_task
from slmkit.eval.metrics import extract, normalize_answer
from slmkit.eval.runner import Evaluator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return slmkit.load(smollm2_gguf, quant="none")


def argmax(values):
    return max(range(len(values)), key=lambda i: values[i])


def recompute(kind, metric, samples):
    """Each metric from the records, independently of slmkit.eval.metrics."""
    if kind in ("multiple_choice", "classification") and metric == "acc":
        return sum(argmax(s["logprobs"]) == s["gold"] for s in samples) / len(samples)
    if metric == "acc_norm":
        return sum(argmax([lp / n for lp, n in zip(s["logprobs"], s["choice_chars"])]) == s["gold"]
                   for s in samples) / len(samples)
    if metric == "macro_f1":
        golds, preds = [s["gold"] for s in samples], [argmax(s["logprobs"]) for s in samples]
        f1s = []
        for c in sorted(set(golds) | set(preds)):
            tp = sum(g == c and p == c for g, p in zip(golds, preds))
            precision = tp / max(1, sum(p == c for p in preds))
            recall = tp / max(1, sum(g == c for g in golds))
            f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
        return sum(f1s) / len(f1s)
    if kind == "generate":
        name = metric.removeprefix("exact_match_")
        return sum(s[f"extracted_{name}"] == s["reference"] for s in samples) / len(samples)
    if kind == "loglikelihood":
        if metric == "acc":
            return sum(s["greedy"] for s in samples) / len(samples)
        return math.exp(-sum(s["logprob"] for s in samples) / len(samples))
    total = sum(s["logprob"] for s in samples)
    unit = {"word_perplexity": "words", "token_perplexity": "tokens", "byte_perplexity": "bytes"}.get(metric)
    if unit:
        return math.exp(-total / sum(s[unit] for s in samples))
    assert metric == "bits_per_byte"
    return -total / sum(s["bytes"] for s in samples) / math.log(2)


CASES = [  # task, limit, few-shot, overrides
    ("arc_easy", 12, 0, {}),
    ("winogrande", 8, 0, {}),  # partial scoring
    ("mmlu", 6, 2, {}),  # description, few-shot from the same subject
    ("sst2", 10, 1, {}),  # few-shot from a different file (GLUE train)
    ("cb", 10, 0, {}),  # three classes, macro-F1
    ("agnews", 8, 0, {}),  # csv, fields that are not identifiers
    ("trec", 8, 0, {}),  # line format with a regex, latin-1
    ("gsm8k", 2, 1, {"data": "gsm8k/train.jsonl", "max_new_tokens": 96}),  # test split is held out
    ("lambada", 8, 0, {}),
    ("wikitext", 1, 0, {}),
]


@pytest.mark.parametrize("name,limit,shots,overrides", CASES, ids=[c[0] for c in CASES])
def test_every_kind_runs_and_metrics_recompute_from_records(lm, shared_data, name, limit, shots, overrides):
    task = load_task(name, **overrides)
    report = evaluate(lm, [task], limit=limit, num_fewshot=shots, data_dir=shared_data, progress=False,
                      max_length=512 if name == "wikitext" else None)  # 512: several rolling windows
    result, samples = report["results"][name], report["samples"][name]
    assert result["n"] == len(samples) == limit
    metrics = [k for k in result if f"{k}_stderr" in result]
    assert metrics
    for metric in metrics:
        assert result[metric] == pytest.approx(recompute(task.kind, metric, samples), abs=1e-12), metric
    if task.kind == "perplexity":
        assert sum(s["tokens"] for s in samples) > 512  # the document really spans several windows
        assert 1 < result["word_perplexity"] < 1000
    if task.kind == "generate":
        assert all(s["generation"] for s in samples)
        assert all("Question:" not in s["generation"] for s in samples)  # cut at the stop string


def test_rolling_perplexity_equals_direct_scoring(lm, tmp_path):
    """A document shorter than the window: its log-likelihood is the sum over tokens given the prefix token."""
    text = "The quick brown fox jumps over the lazy dog. It was not amused, and said so at length."
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": text}) + "\n")
    (tmp_path / "mine.yaml").write_text(
        f"name: mine\nkind: perplexity\ndata: {{path: {tmp_path / 'docs.jsonl'}}}\ntext: body\n")
    report = evaluate(lm, [str(tmp_path / "mine.yaml")], progress=False)
    got = report["samples"]["mine"][0]["logprob"]
    tokens = lm.tokenizer.encode(text, add_special_tokens=False)
    ids = [lm.tokenizer.bos_id] + tokens
    logprobs = torch.log_softmax(lm.logits(ids)[0], -1)
    want = sum(float(logprobs[i, t]) for i, t in enumerate(tokens))
    assert got == pytest.approx(want, abs=1e-3)
    assert report["samples"]["mine"][0]["tokens"] == len(tokens)


def test_same_command_twice_gives_identical_results(smollm2_gguf, shared_data, tmp_path, capsys):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.json"
        assert main(["eval", str(smollm2_gguf), "--tasks", "arc_challenge,lambada", "--limit", "4",
                     "--num-fewshot", "1", "--data-dir", str(shared_data), "--output", str(out)]) == 0
        report = json.loads(out.read_text())
        for res in report["results"].values():
            res.pop("seconds")
        outputs.append(report)
    assert outputs[0] == outputs[1]
    table = capsys.readouterr().out
    assert "arc_challenge" in table and "acc_norm" in table


def test_prompts_are_built_like_lm_evaluation_harness(lm, shared_data):
    """MMLU, 2 shots: subject line, the first other questions of the same subject with their letters."""
    ev = Evaluator(lm, data_dir=shared_data, progress=False)
    task = load_task("mmlu")
    docs = [json.loads(line) for line in (shared_data / "mmlu" / "mmlu_dev.jsonl").open()]
    doc = docs[7]  # anatomy, the third of its subject
    same = [d for d in docs if d["subject"] == doc["subject"]]

    def block(d):
        return (d["question"].strip() + "\n" + "\n".join(f"{l}. {c}" for l, c in zip("ABCD", d["choices"]))
                + "\nAnswer:")

    want = (f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
            + "".join(block(d) + " " + "ABCD"[d["answer"]] + "\n\n" for d in same[:2]))
    assert ev.fewshot_prefix(task, doc, 7, docs, True, 2) == want
    # a trailing space of the context moves to the front of the continuation
    ctx, cont = ev.encode_pair("Answer: ", "Paris")
    assert ctx == lm.tokenizer.encode("Answer:", add_special_tokens=False)
    assert ctx + cont == lm.tokenizer.encode("Answer: Paris", add_special_tokens=False)


def test_fewshot_sampling_is_seeded_and_never_shows_the_item(lm, shared_data):
    task = load_task("arc_easy")
    docs = [json.loads(line) for line in (shared_data / "commonsense_mc" / "arc_easy.jsonl").open()][:30]
    a = Evaluator(lm, seed=1, progress=False)
    b = Evaluator(lm, seed=2, progress=False)
    prefixes = [a.fewshot_prefix(task, d, i, docs, True, 3) for i, d in enumerate(docs)]
    assert prefixes == [a.fewshot_prefix(task, d, i, docs, True, 3) for i, d in enumerate(docs)]
    assert prefixes != [b.fewshot_prefix(task, d, i, docs, True, 3) for i, d in enumerate(docs)]
    for d, p in zip(docs, prefixes):
        assert d["query"] + "\n" not in p and p.count("\n\n") == 3


def test_answer_extraction_follows_gsm8k_rules():
    strict, flexible = "#### (\\-?[0-9\\.\\,]+)", "(-?[$0-9.,]{2,})|(-?[0-9]+)"
    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    text = "She pays 3 * $400 = $1,200.\n#### 1,200"
    assert normalize_answer(extract(text, strict, 0, "[invalid]"), True, ignore) == "1200"
    assert normalize_answer(extract("so the total is $1,200.", flexible, -1, "[invalid]"), True, ignore) == "1200"
    assert extract("no number here", strict, 0, "[invalid]") == "[invalid]"
    assert normalize_answer("Natalia sold 72 clips.\n#### 72", True, ignore) == "72"


# ------------------------------------------------------------------ bad input
def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_unknown_task_is_named(smollm2_gguf, capsys):
    code, err = run_cli(["eval", str(smollm2_gguf), "--tasks", "arc_easy,hellaswog"], capsys)
    assert code == 2 and "unknown task 'hellaswog'" in err and "hellaswag" in err


def test_missing_data_file_names_the_path_and_the_setting(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, err = run_cli(["eval", "no-such-model", "--tasks", "piqa", "--data-dir", str(tmp_path),
                         "--output", str(out)], capsys)
    assert code == 2 and "commonsense_mc/piqa.jsonl" in err and "SLMKIT_DATA" in err
    assert not out.exists()  # nothing written as if complete


def test_malformed_task_files_fail_before_the_model_loads(tmp_path, capsys):
    cases = {
        "syntax.yaml": ("name: x\nkind: [oops", "not valid YAML"),
        "kind.yaml": ("name: x\nkind: essay\ndata: a.jsonl\n", "unknown kind 'essay'"),
        "metric.yaml": ("name: x\nkind: multiple_choice\ndata: a.jsonl\nchoices: c\ntarget: g\nmetrics: [bleu]\n",
                        "bleu"),
        "field.yaml": ("name: x\nkind: perplexity\ndata: a.jsonl\ntxet: body\n", "unknown task field(s) txet"),
        "template.yaml": ("name: x\nkind: generate\ndata: a.jsonl\nanswer: a\nprompt: '{{ q '\n", "template syntax"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        code, err = run_cli(["eval", "no-such-model", "--tasks", str(tmp_path / name)], capsys)
        assert code == 2 and message in err, (name, err)


def test_a_field_missing_from_the_data_is_named(lm, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "2+2?", "options": ["4", "5"], "gold": 0}) + "\n")
    task = {"name": "t", "kind": "multiple_choice", "data": str(tmp_path / "d.jsonl"), "prompt": "{{ query }}",
            "choices": "options", "target": "gold"}
    from slmkit.eval.task import Task

    with pytest.raises(slmkit.SlmError, match="prompt uses a field the data does not have.*query.*question"):
        evaluate(lm, [Task.from_dict(task)], progress=False)


def test_bad_numbers_and_output_folder_fail_before_the_model_loads(shared_data, tmp_path, capsys):
    for flag, value, message in [("--limit", "0", "limit must be >= 1"), ("--num-fewshot", "-1", "num_fewshot"),
                                 ("--batch-size", "0", "batch size must be >= 1")]:
        code, err = run_cli(["eval", "no-such-model", "--tasks", "copa", flag, value,
                             "--data-dir", str(shared_data)], capsys)
        assert code == 2 and message in err
    code, err = run_cli(["eval", "no-such-model", "--tasks", "copa", "--data-dir", str(shared_data),
                         "--output", str(tmp_path / "nope" / "r.json")], capsys)
    assert code == 2 and "folder does not exist" in err
