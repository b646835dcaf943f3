"""SuperICL (Xu et al., "Small Models are Valuable Plug-ins for Large Language Models", 2023).

1. Fine-tune a small classifier (the plug-in) on the task's whole training split.
2. Sample k training examples as demonstrations; each shows its input, the plug-in's prediction with its
   confidence (2 decimals) and the gold label. The test input follows with the plug-in's prediction, and the
   large model writes the final label; when it overrides the plug-in it is asked to explain.
Baselines on the same demonstrations and test items: the large model's plain in-context learning (no plug-in
lines) and the plug-in alone. ``slm supericl CONFIG.yaml`` runs all three arms for every task and seed.

Prompts follow the paper's code (JetRunner/SuperICL run_glue.py): blocks ``{input}\\n{Name} Prediction: {label}
(Confidence: {c})\\nLabel: {gold}`` joined by blank lines, the test block ending in ``Label: ``. Here the large
model stops at the end of the line and decodes greedily (the paper sampled text-davinci-003 at temperature 1,
top_p 0.5), and the explanation prompt holds the overriding label before ``Explanation for overriding the
prediction:``. An answer that is no label word is counted as unparsed (and wrong), never mapped to a label.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import SlmError
from ..eval.data import read_records
from ..teacher import CachedTeacher, EndpointTeacher, LocalTeacher, Teacher
from ..train.common import write_atomically
from ..train.config import config_from_dict, parse_section, read_config_file

TASKS_FILE = Path(__file__).with_name("supericl_tasks.yaml")
ARMS = ("plugin", "icl", "supericl")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class PluginSection:
    init: str = "all-minilm-l6-v2"  # the encoder fine-tuned as the plug-in (registry name or HF folder)
    name: str = "MiniLM"  # what prompts call it: "{name} Prediction: ..."
    max_steps: int = 600  # fine-tuning steps (batches of batch_size drawn from the whole training split)
    batch_size: int = 32
    lr: float = 5.0e-5
    seq_len: int = 128


@dataclass
class LargeSection:
    model: str = "qwen2.5-coder-0.5b-instruct"  # loaded here; with an endpoint, the served model's name
    endpoint: str | None = None  # an OpenAI-compatible base URL (slm serve, vLLM, a hosted API)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key, if it needs one
    batch_size: int = 8  # prompts per batch (in process) or concurrent requests (endpoint)
    max_new_tokens: int = 10  # the paper's max_tokens for the label
    explanation_tokens: int = 100


@dataclass
class SuperICLConfig:
    out_dir: str = "runs/supericl"
    data_dir: str | None = None  # relative data paths are read here (default $SLMKIT_DATA)
    tasks: list[str] = field(default_factory=lambda: ["sst2", "rte", "agnews"])
    task_specs: dict[str, Any] = field(default_factory=dict)  # more or replaced tasks, as in supericl_tasks.yaml
    test_examples: int = 200  # test items per task (a seeded sample of the held-out split; 0 = all)
    demonstrations: int = 32  # k, the paper's GLUE setting
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # one demonstration sample per seed
    explanation: bool = True  # ask the large model why, whenever it overrides the plug-in
    plugin: PluginSection = field(default_factory=PluginSection)
    large: LargeSection = field(default_factory=LargeSection)


def load_config(path: str | Path, overrides: list[str] | None = None) -> SuperICLConfig:
    return config_from_mapping(read_config_file(path, overrides))


def config_from_mapping(raw: dict) -> SuperICLConfig:
    if not isinstance(raw, dict):
        raise SlmError("config: the file must hold a mapping")
    raw = dict(raw)
    raw.pop("method", None)
    sections = {"plugin": PluginSection, "large": LargeSection}
    values = {k: v for k, v in raw.items() if k not in sections}
    top = parse_section(SuperICLConfig, values, "supericl")
    for name, cls in sections.items():
        setattr(top, name, parse_section(cls, raw.get(name), name))
    check_config(top)
    return top


def check_config(cfg: SuperICLConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SlmError(f"config: {message}")

    need(isinstance(cfg.tasks, list) and cfg.tasks and all(isinstance(t, str) for t in cfg.tasks),
         f"tasks must be a list of task names, got {cfg.tasks!r}")
    need(_is_int(cfg.demonstrations) and cfg.demonstrations >= 1, "demonstrations must be an integer >= 1")
    need(_is_int(cfg.test_examples) and cfg.test_examples >= 0, "test_examples must be an integer >= 0")
    need(isinstance(cfg.seeds, list) and cfg.seeds and all(_is_int(s) for s in cfg.seeds),
         f"seeds must be a list of integers, got {cfg.seeds!r}")
    need(_is_int(cfg.plugin.max_steps) and cfg.plugin.max_steps >= 1, "plugin.max_steps must be an integer >= 1")
    need(_is_int(cfg.large.batch_size) and cfg.large.batch_size >= 1, "large.batch_size must be an integer >= 1")
    need(isinstance(cfg.task_specs, dict), "task_specs must be a mapping of task name -> definition")
    specs = task_specs(cfg)
    unknown = [t for t in cfg.tasks if t not in specs]
    need(not unknown, f"unknown task(s) {', '.join(unknown)} (defined: {', '.join(sorted(specs))}; add one under "
                      f"task_specs)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ tasks
@dataclass
class FileSpec:
    path: str | list[str]
    format: str
    pattern: str | None = None
    rename: dict[str, str] = field(default_factory=dict)  # template field -> the file's field
    label_values: dict[str, str] = field(default_factory=dict)  # the file's raw label -> label word


@dataclass
class TaskSpec:
    name: str
    labels: list[str]
    train: FileSpec
    test: FileSpec
    input: str
    plugin_input: str
    label: str = "label"  # the field holding the gold label (after rename)


@dataclass
class Example:
    fields: dict[str, str]
    label: int  # class index into TaskSpec.labels


def task_specs(cfg: SuperICLConfig) -> dict[str, dict]:
    builtin = yaml.safe_load(TASKS_FILE.read_text(encoding="utf-8"))
    return {**builtin, **cfg.task_specs}


def task_spec(name: str, raw: dict) -> TaskSpec:
    where = f"task {name}"
    if not isinstance(raw, dict):
        raise SlmError(f"{where}: a task definition must be a mapping")
    try:
        values = dict(raw)
        values["train"] = parse_section(FileSpec, values.get("train"), f"{where}.train")
        values["test"] = parse_section(FileSpec, values.get("test"), f"{where}.test")
        spec = parse_section(TaskSpec, {"name": name, **values}, where)
    except TypeError as exc:
        raise SlmError(f"{where}: {exc}") from None
    if not isinstance(spec.labels, list) or len(spec.labels) < 2 or not all(isinstance(x, str) for x in spec.labels):
        raise SlmError(f"{where}: labels must list two or more label words")
    return spec


def read_examples(spec: TaskSpec, which: str, data_dir: str | None) -> list[Example]:
    """The examples of a task's ``train`` or ``test`` file(s), with labels as class indices."""
    fs: FileSpec = getattr(spec, which)
    paths = fs.path if isinstance(fs.path, list) else [fs.path]
    out = []
    for path in paths:
        for n, record in enumerate(read_records(path, fs.format, data_dir=data_dir, pattern=fs.pattern), 1):
            where = f"{path}: record {n}"
            fields = {}
            for key in _template_fields(spec) | {spec.label}:
                source = fs.rename.get(key, key)
                if source not in record:
                    raise SlmError(f"{where}: no field {source!r} (task {spec.name} needs it; has "
                                   f"{', '.join(map(str, record))})")
                fields[key] = str(record[source]).strip()
            out.append(Example(fields, label_of(fields.pop(spec.label), spec, fs, where)))
    return out


def _template_fields(spec: TaskSpec) -> set[str]:
    import string

    names = set()
    for template in (spec.input, spec.plugin_input):
        names |= {f for _, f, _, _ in string.Formatter().parse(template) if f}
    return names - {"sep"}


def label_of(raw: str, spec: TaskSpec, fs: FileSpec, where: str) -> int:
    word = fs.label_values.get(raw, raw)
    if word in spec.labels:
        return spec.labels.index(word)
    if word.isdigit() and int(word) < len(spec.labels):
        return int(word)
    raise SlmError(f"{where}: label {raw!r} is none of {', '.join(spec.labels)} (nor a class index)")


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class PluginGuess:
    label: int
    confidence: float


def demonstration_block(spec: TaskSpec, ex: Example, guess: PluginGuess | None, plugin_name: str) -> str:
    """One in-context example: the input, the plug-in's line (SuperICL only) and the gold label."""
    return test_block(spec, ex, guess, plugin_name) + spec.labels[ex.label]


def test_block(spec: TaskSpec, ex: Example, guess: PluginGuess | None, plugin_name: str) -> str:
    """The test input, the plug-in's line (SuperICL only), and ``Label: `` for the large model to complete."""
    text = spec.input.format(**ex.fields)
    if guess is not None:
        text += f"\n{plugin_name} Prediction: {spec.labels[guess.label]} (Confidence: {guess.confidence:.2f})"
    return text + "\nLabel: "


def build_prompt(spec: TaskSpec, demos: list[tuple[Example, PluginGuess | None]], test: Example,
                 guess: PluginGuess | None, plugin_name: str) -> str:
    context = "".join(demonstration_block(spec, ex, g, plugin_name) + "\n\n" for ex, g in demos)
    return context + test_block(spec, test, guess, plugin_name)


def parse_label(answer: str, labels: list[str]) -> int | None:
    """The label word the large model wrote (exactly, else ignoring case and end punctuation), or None."""
    text = answer.strip().splitlines()[0].strip() if answer.strip() else ""
    if text in labels:
        return labels.index(text)
    folded = text.strip(" .,:;!\"'").lower()
    matches = [i for i, label in enumerate(labels) if label.lower() == folded]
    return matches[0] if len(matches) == 1 else None


# ------------------------------------------------------------------------------------------------ plug-in
def train_plugin(cfg: SuperICLConfig, spec: TaskSpec, train: list[Example], out: Path) -> Path:
    """Fine-tune the plug-in on the whole training split with the one Trainer (task ``classify``); a finished
    plug-in in ``out/model`` is reused."""
    from ..api import load
    from ..train.run import train as run_training

    model_dir = out / "model"
    if (model_dir / "config.json").is_file() and (out / "eval.json").is_file():
        print(f"supericl: {spec.name}: reusing the plug-in in {model_dir}", file=sys.stderr)
        return model_dir
    sep = load(cfg.plugin.init).special_tokens.get("sep_token", "</s>")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"text": spec.plugin_input.format(sep=sep, **ex.fields), "label": spec.labels[ex.label]} for ex in train]
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    steps = cfg.plugin.max_steps
    raw = {
        "task": "classify", "out_dir": str(out.resolve()),
        "model": {"init": cfg.plugin.init, "num_labels": len(spec.labels), "labels": spec.labels},
        "data": {"train_file": str(data.resolve()), "seq_len": cfg.plugin.seq_len, "val_fraction": 0.02},
        "optim": {"lr": cfg.plugin.lr, "min_lr": 0.0, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01,
                  "schedule": "wsd", "warmup_steps": max(1, steps // 16), "decay_fraction": 0.94},
        "run": {"micro_batch_size": cfg.plugin.batch_size, "max_steps": steps, "eval_every": steps,
                "eval_batches": 8, "save_every": steps, "log_every": 10},
    }
    run_training(config_from_dict(raw))
    return model_dir


def plugin_guesses(plugin, spec: TaskSpec, examples: list[Example]) -> list[PluginGuess]:
    """The fine-tuned plug-in's (an EncoderLM) label and confidence (softmax max) for each example."""
    sep = plugin.special_tokens.get("sep_token", "</s>")
    texts = [spec.plugin_input.format(sep=sep, **ex.fields) for ex in examples]
    probs = torch.softmax(plugin.classify(texts, batch_size=32), dim=-1)
    conf, label = probs.max(dim=-1)
    return [PluginGuess(int(i), float(c)) for i, c in zip(label, conf)]


# ------------------------------------------------------------------------------------------------ large model
def large_model(cfg: SuperICLConfig, out: Path) -> Teacher:
    """The large model as a Teacher (in this process, or any OpenAI-compatible endpoint), with a resumable
    cache of its answers in ``out/large_answers.jsonl``."""
    if cfg.large.endpoint:
        teacher = EndpointTeacher(cfg.large.endpoint, cfg.large.model, api_key=os.environ.get(cfg.large.api_key_env),
                                  concurrency=cfg.large.batch_size)
    else:
        from ..api import load

        teacher = LocalTeacher(load(cfg.large.model), batch_size=cfg.large.batch_size, model_id=cfg.large.model)
    return CachedTeacher(teacher, out / "large_answers.jsonl")


# ------------------------------------------------------------------------------------------------ the run
def run_task(cfg: SuperICLConfig, spec: TaskSpec, test: list[Example], large: Teacher, out: Path) -> dict:
    """One task's three arms on ``test`` (the held-out items), over every seed."""
    from ..api import load

    train = read_examples(spec, "train", cfg.data_dir)
    if cfg.demonstrations > len(train):
        raise SlmError(f"task {spec.name}: {cfg.demonstrations} demonstrations asked, the training split has "
                       f"{len(train)} examples")
    plugin = load(train_plugin(cfg, spec, train, out / "plugin"))
    test_guesses = plugin_guesses(plugin, spec, test)
    gold = [ex.label for ex in test]
    result = {"task": spec.name, "labels": spec.labels, "train_examples": len(train), "test_examples": len(test),
              "plugin": {"accuracy": _accuracy([g.label for g in test_guesses], gold)}, "seeds": {}}
    predictions = []
    for seed in cfg.seeds:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)  # the paper: shuffle the training split, take the first k
        demos = [train[i] for i in order[:cfg.demonstrations]]
        demo_guesses = plugin_guesses(plugin, spec, demos)
        icl = [build_prompt(spec, [(d, None) for d in demos], ex, None, cfg.plugin.name) for ex in test]
        sup = [build_prompt(spec, list(zip(demos, demo_guesses)), ex, g, cfg.plugin.name)
               for ex, g in zip(test, test_guesses)]
        icl_answers = large.complete(icl, cfg.large.max_new_tokens, stop=["\n"], chat=False)
        sup_answers = large.complete(sup, cfg.large.max_new_tokens, stop=["\n"], chat=False)
        icl_labels = [parse_label(a, spec.labels) for a in icl_answers]
        sup_labels = [parse_label(a, spec.labels) for a in sup_answers]
        overrides = [i for i, (s, g) in enumerate(zip(sup_labels, test_guesses)) if s is not None and s != g.label]
        explanations = {}
        if cfg.explanation and overrides:
            asks = [sup[i] + sup_answers[i].strip() + "\nExplanation for overriding the prediction:" for i in overrides]
            for i, text in zip(overrides, large.complete(asks, cfg.large.explanation_tokens, stop=["\n\n"],
                                                         chat=False)):
                explanations[i] = text.strip()
        right = [i for i in overrides if sup_labels[i] == gold[i]]
        result["seeds"][str(seed)] = {
            "icl": {"accuracy": _accuracy(icl_labels, gold), "unparsed": icl_labels.count(None)},
            "supericl": {"accuracy": _accuracy(sup_labels, gold), "unparsed": sup_labels.count(None),
                         "overrides": len(overrides), "override_rate": len(overrides) / len(test),
                         "overrides_right": len(right),
                         "override_accuracy": len(right) / len(overrides) if overrides else None,
                         "plugin_confidence_when_overridden": (statistics.mean(test_guesses[i].confidence
                                                                               for i in overrides)
                                                               if overrides else None)},
        }
        for i, ex in enumerate(test):
            predictions.append({"seed": seed, "item": i, "gold": spec.labels[ex.label],
                                "plugin": spec.labels[test_guesses[i].label],
                                "plugin_confidence": round(test_guesses[i].confidence, 4),
                                "icl_answer": icl_answers[i], "supericl_answer": sup_answers[i],
                                **({"explanation": explanations[i]} if i in explanations else {})})
        (out / "prompt_example.txt").write_text(sup[0], encoding="utf-8")  # what the large model read
    write_atomically(out / "predictions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions))
    result["summary"] = summarise(result)
    return result


def summarise(result: dict) -> dict:
    """Mean and standard deviation over seeds of each arm's accuracy, and the override figures."""
    seeds = list(result["seeds"].values())

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    return {
        "plugin": {"mean": result["plugin"]["accuracy"], "std": 0.0},
        "icl": stats([s["icl"]["accuracy"] for s in seeds]),
        "supericl": stats([s["supericl"]["accuracy"] for s in seeds]),
        "icl_unparsed": sum(s["icl"]["unparsed"] for s in seeds),
        "supericl_unparsed": sum(s["supericl"]["unparsed"] for s in seeds),
        "override_rate": stats([s["supericl"]["override_rate"] for s in seeds]),
        "overrides": sum(s["supericl"]["overrides"] for s in seeds),
        "overrides_right": sum(s["supericl"]["overrides_right"] for s in seeds),
    }


def _accuracy(predicted: list[int | None], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)


def table(results: list[dict], cfg: SuperICLConfig) -> str:
    def cell(s):
        return "n/a" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    lines = [f"| task | test items | plug-in ({cfg.plugin.name}) | ICL ({cfg.large.model}) | SuperICL | "
             f"unparsed ICL / SuperICL | override rate | overrides right |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        right = f"{s['overrides_right']} / {s['overrides']}"
        lines.append(f"| {r['task']} | {r['test_examples']} | {cell(s['plugin'])} | {cell(s['icl'])} | "
                     f"{cell(s['supericl'])} | {s['icl_unparsed']} / {s['supericl_unparsed']} | "
                     f"{cell(s['override_rate'])} | {right} |")
    return "\n".join(lines) + "\n"


def run(cfg: SuperICLConfig, large: Teacher | None = None) -> list[dict]:
    """Every task's three arms over every seed; writes ``results.json`` and ``results.md`` in ``out_dir``.
    ``large`` replaces the large model the config names (any Teacher)."""
    check_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = task_specs(cfg)
    tasks = [task_spec(name, specs[name]) for name in cfg.tasks]
    tests = {}
    for spec in tasks:  # read every test file first: a bad one fails before any training
        test = read_examples(spec, "test", cfg.data_dir)
        if cfg.test_examples and cfg.test_examples < len(test):
            test = random.Random(0).sample(test, cfg.test_examples)
        tests[spec.name] = test
    started = time.time()
    large = large if large is not None else large_model(cfg, out)
    results = []
    for spec in tasks:
        print(f"supericl: task {spec.name}", file=sys.stderr)
        (out / spec.name).mkdir(exist_ok=True)
        results.append(run_task(cfg, spec, tests[spec.name], large, out / spec.name))
        write_report(out, cfg, results, time.time() - started, done=len(results) == len(tasks))
    return results


def write_report(out: Path, cfg: SuperICLConfig, results: list[dict], seconds: float, done: bool) -> None:
    """``results.json`` and ``results.md`` for the tasks finished so far (rewritten after each task)."""
    report = {"config": dataclasses.asdict(cfg), "complete": done, "wall_seconds": round(seconds, 1),
              "results": results}
    write_atomically(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "results.md", table(results, cfg))

