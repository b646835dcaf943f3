"""``slm lad CONFIG.yaml``: LAD against distil-then-prune on SST-2 and AG News, every arm in one run.

Stages (each reused when already trained; an interrupted one continues): the teacher fine-tuned on each
dataset; two general-distilled students from the teacher's pretrained layers (LAD's three terms under
sampled length configurations, and plain distillation); per dataset and student, task distillation (LAD's
sandwich of pruned sub-models, or plain KD). Then for each student an evolutionary length search on a split
held out of the training data, and, at each token budget, the best configuration's test accuracy, FLOPs and
measured CPU latency, beside constant schedules. Results: ``results.json``, ``results.md``, ``lad.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import SlmError
from ...train.common import data_path, positive_int, write_atomically
from ...train.config import parse_section, read_config_file
from .data import corpus_lines, read_examples, write_jsonl
from .pruning import classify_pruned, encoder_flops, token_budget
from .search import best_within, evolutionary_search, pareto_front

VARIANT_NAMES = {"lad": "LAD", "plain": "KD, then pruned"}


@dataclass
class DatasetSection:
    train: str = ""
    test: str = ""
    labels: int = 2
    search_examples: int = 500  # held out of `train`: validation of every stage and the length search
    train_examples: int = 0  # 0: the rest of `train`
    test_examples: int = 0  # 0: all of `test`


@dataclass
class GeneralStage:
    lines: int = 20000  # unlabeled corpus lines
    steps: int = 300
    micro_batch_size: int = 32
    seq_len: int = 64
    lr: float = 1.0e-4
    student_layers: list[int] = field(default_factory=lambda: [0, 2, 4, 5])
    drop_bounds: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    queue_size: int = 4096
    weight: float = 0.5


@dataclass
class TeacherStage:
    epochs: float = 2.0
    lr: float = 5.0e-5
    micro_batch_size: int = 32


@dataclass
class DistillStage:
    epochs: float = 3.0
    lr: float = 1.0e-4
    micro_batch_size: int = 32
    sub_models: int = 2
    temperature: float = 1.0
    drop_bounds: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


@dataclass
class SearchSection:
    iterations: int = 6
    mutations: int = 12
    crossovers: int = 6


@dataclass
class LatencySection:
    examples: int = 256  # test examples timed, in batches
    batch_size: int = 32
    repeats: int = 3  # best of


@dataclass
class LADConfig:
    out_dir: str = "runs/lad"
    data_dir: str | None = None
    teacher: str = "all-minilm-l6-v2"
    corpus: list[str] = field(default_factory=lambda: ["pretrain_corpus"])
    seed: int = 0
    precision: str = "auto"
    seq_len: int = 128
    budgets: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.5, 0.3])
    datasets: dict[str, DatasetSection] = field(default_factory=dict)
    general: GeneralStage = field(default_factory=GeneralStage)
    teacher_ft: TeacherStage = field(default_factory=TeacherStage)
    distill: DistillStage = field(default_factory=DistillStage)
    search: SearchSection = field(default_factory=SearchSection)
    latency: LatencySection = field(default_factory=LatencySection)


_SUBSECTIONS = {"general": GeneralStage, "teacher_ft": TeacherStage, "distill": DistillStage,
                "search": SearchSection, "latency": LatencySection}


def load_config(path: str | Path, overrides: list[str] | None = None) -> LADConfig:
    return config_from_mapping(read_config_file(path, overrides))


def config_from_mapping(raw: dict) -> LADConfig:
    if not isinstance(raw, dict):
        raise SlmError("config: the file must hold a mapping")
    values = {k: v for k, v in raw.items() if k not in _SUBSECTIONS and k != "datasets"}
    top = parse_section(LADConfig, values, "lad")
    for name, cls in _SUBSECTIONS.items():
        setattr(top, name, parse_section(cls, raw.get(name), name))
    datasets = raw.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise SlmError("config: datasets must map names to {train, test, labels} sections")
    top.datasets = {str(name): parse_section(DatasetSection, section, f"datasets.{name}")
                    for name, section in datasets.items()}
    check_config(top)
    return top


def check_config(cfg: LADConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SlmError(f"config: {message}")

    for name, ds in cfg.datasets.items():
        need(name.replace("_", "").replace("-", "").isalnum(), f"datasets: name {name!r} must be letters, digits, - or _")
        need(bool(ds.train) and bool(ds.test), f"datasets.{name}: give train and test files")
        need(positive_int(ds.labels) and ds.labels >= 2, f"datasets.{name}.labels must be an integer >= 2")
        need(positive_int(ds.search_examples), f"datasets.{name}.search_examples must be an integer >= 1")
    for name in ("general.lines", "general.steps", "general.micro_batch_size", "general.seq_len",
                 "teacher_ft.micro_batch_size", "distill.micro_batch_size", "distill.sub_models",
                 "search.iterations", "search.mutations", "latency.examples", "latency.batch_size",
                 "latency.repeats", "seq_len"):
        section, _, key = name.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, key)
        need(positive_int(value), f"{name} must be an integer >= 1, got {value!r}")
    need(cfg.teacher_ft.epochs > 0 and cfg.distill.epochs > 0, "teacher_ft.epochs and distill.epochs must be > 0")
    need(isinstance(cfg.budgets, list) and cfg.budgets and all(
        isinstance(b, (int, float)) and 0 < b <= 1 for b in cfg.budgets), f"budgets must be fractions in (0, 1], got {cfg.budgets!r}")


# ------------------------------------------------------------------------------------------------ data
def corpus_files(cfg: LADConfig) -> list[Path]:
    files = []
    for entry in cfg.corpus:
        path = Path(data_path(entry, cfg.data_dir))
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    if not files:
        raise SlmError(f"corpus: no .jsonl files in {cfg.corpus}")
    return files


def prepare_data(cfg: LADConfig, out: Path) -> dict[str, dict[str, Path]]:
    """Each dataset's train / search / test JSONL under ``out/data`` (the search split is held out of train)."""
    files = {}
    for name, ds in cfg.datasets.items():
        train = read_examples(data_path(ds.train, cfg.data_dir))
        test = read_examples(data_path(ds.test, cfg.data_dir))
        for split, examples in (("train", train), ("test", test)):
            bad = next((y for _, y in examples if not 0 <= y < ds.labels), None)
            if bad is not None:
                raise SlmError(f"datasets.{name}.{split}: class {bad} outside 0..{ds.labels - 1} (labels: {ds.labels})")
        rng = random.Random(cfg.seed)
        rng.shuffle(train)
        if len(train) <= ds.search_examples:
            raise SlmError(f"datasets.{name}: {len(train)} training examples, search_examples is {ds.search_examples}")
        search, rest = train[:ds.search_examples], train[ds.search_examples:]
        rest = rest[:ds.train_examples] if ds.train_examples else rest
        if ds.test_examples:
            test = random.Random(cfg.seed + 1).sample(test, min(ds.test_examples, len(test)))
        folder = out / "data" / name
        files[name] = {split: write_jsonl(folder / f"{split}.jsonl", ex)
                       for split, ex in (("train", rest), ("search", search), ("test", test))}
    lines = corpus_lines(corpus_files(cfg), cfg.general.lines, cfg.seed)
    files["_corpus"] = {"train": write_jsonl(out / "data" / "corpus.jsonl", [(line, 0) for line in lines])}
    return files


# ------------------------------------------------------------------------------------------------ stages
def _run(cfg: LADConfig, steps: int, micro: int) -> dict:
    return {"precision": cfg.precision, "seed": cfg.seed, "max_steps": steps, "micro_batch_size": micro,
            "eval_every": max(1, steps // 4), "eval_batches": 16, "save_every": max(1, steps // 4), "log_every": 5}


def _steps(n_examples: int, epochs: float, micro: int) -> int:
    return max(1, math.ceil(n_examples * epochs / micro))


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _optim(lr: float, steps: int) -> dict:
    return {"lr": lr, "min_lr": 0.0, "warmup_steps": max(1, steps // 10), "weight_decay": 0.01,
            "schedule": "wsd", "decay_fraction": 0.9, "grad_clip": 1.0}


def train_teacher(cfg: LADConfig, name: str, files: dict, out: Path) -> Path:
    from ...train.run import train_stage

    ds, stage = cfg.datasets[name], cfg.teacher_ft
    steps = _steps(_count(files["train"]), stage.epochs, stage.micro_batch_size)
    raw = {"task": "classify", "out_dir": str((out / name / "teacher").resolve()),
           "model": {"init": cfg.teacher, "num_labels": ds.labels},
           "data": {"train_file": str(files["train"].resolve()), "val_file": str(files["search"].resolve()),
                    "seq_len": cfg.seq_len},
           "optim": _optim(stage.lr, steps), "run": _run(cfg, steps, stage.micro_batch_size)}
    return train_stage(raw, f"fine-tune the teacher on {name} ({steps} steps)", "lad")


def general_distill(cfg: LADConfig, variant: str, corpus: Path, out: Path) -> Path:
    from ...train.run import train_stage

    g = cfg.general
    raw = {"task": "lad_general", "out_dir": str((out / f"general-{variant}").resolve()),
           "lad_general": {"teacher": cfg.teacher, "student_layers": g.student_layers, "variant": variant,
                           "drop_bounds": g.drop_bounds, "queue_size": g.queue_size, "weight": g.weight},
           "data": {"train_file": str(corpus.resolve()), "seq_len": g.seq_len, "val_fraction": 0.02},
           "optim": _optim(g.lr, g.steps), "run": _run(cfg, g.steps, g.micro_batch_size)}
    return train_stage(raw, f"general distillation, {variant} ({g.steps} steps)", "lad")


def task_distill(cfg: LADConfig, name: str, variant: str, student: Path, teacher: Path, files: dict,
                 out: Path) -> Path:
    from ...train.run import train_stage

    ds, stage = cfg.datasets[name], cfg.distill
    steps = _steps(_count(files["train"]), stage.epochs, stage.micro_batch_size)
    raw = {"task": "lad_task", "out_dir": str((out / name / f"student-{variant}").resolve()),
           "model": {"init": str(student.resolve()), "num_labels": ds.labels},
           "lad_task": {"teacher": str(teacher.resolve()), "variant": variant, "drop_bounds": stage.drop_bounds,
                        "sub_models": stage.sub_models, "temperature": stage.temperature},
           "data": {"train_file": str(files["train"].resolve()), "val_file": str(files["search"].resolve()),
                    "seq_len": cfg.seq_len},
           "optim": _optim(stage.lr, steps), "run": _run(cfg, steps, stage.micro_batch_size)}
    return train_stage(raw, f"task distillation on {name}, {variant} ({steps} steps)", "lad")


# ------------------------------------------------------------------------------------------------ evaluation
def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Encoded:
    """A labelled split (``{"text", "label"}`` rows) tokenized once, in batches sorted by length (little padding)."""

    def __init__(self, rows: list[dict], tokenizer, max_length: int, batch_size: int = 64):
        from ...train.encoder_tasks import encode_texts

        ids = encode_texts(tokenizer, [r["text"] for r in rows], max_length)
        order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
        pad = tokenizer.pad_id
        self.batches, self.lengths = [], [len(x) for x in ids]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(ids[k]) for k in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            m = torch.zeros_like(x)
            for row, k in enumerate(chunk):
                x[row, :len(ids[k])] = torch.tensor(ids[k])
                m[row, :len(ids[k])] = 1
            self.batches.append((x, m, torch.tensor([int(rows[k]["label"]) for k in chunk])))

    def __len__(self) -> int:
        return len(self.lengths)


@torch.inference_mode()
def correct(model, data: Encoded, ratios) -> torch.Tensor:
    """Per example (in the split's batch order): 1 where the pruned model's prediction is right."""
    return torch.cat([(classify_pruned(model, x, m, ratios).argmax(-1) == y).float() for x, m, y in data.batches])


def accuracy(model, data: Encoded, ratios) -> float:
    return float(correct(model, data, ratios).mean())


def paired_difference(a: torch.Tensor, b: torch.Tensor, seed: int, resamples: int = 2000) -> dict[str, float]:
    """Accuracy of ``a`` minus ``b`` on the same examples, with a 95 % paired bootstrap interval."""
    gen = torch.Generator().manual_seed(seed)
    diff = a - b
    draws = torch.randint(0, len(diff), (resamples, len(diff)), generator=gen)
    means = diff[draws].mean(1).sort().values
    return {"difference": float(diff.mean()), "low": float(means[int(0.025 * resamples)]),
            "high": float(means[int(0.975 * resamples) - 1])}


def flops_ratio(model_cfg, reference_cfg, data: Encoded, ratios) -> float:
    """FLOPs of the layers under ``ratios`` over the split, relative to ``reference_cfg`` un-pruned."""
    spent = sum(encoder_flops(model_cfg, n, ratios) for n in data.lengths)
    return spent / sum(encoder_flops(reference_cfg, n) for n in data.lengths)


@torch.inference_mode()
def latency_ms(model, data: Encoded, ratios, repeats: int) -> float:
    """Best-of-``repeats`` wall time over the timed batches, per batch."""
    classify_pruned(model, *data.batches[0][:2], ratios)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, m, _ in data.batches:
            classify_pruned(model, x, m, ratios)
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / len(data.batches)


def evaluate_dataset(cfg: LADConfig, name: str, files: dict, teacher_dir: Path,
                     students: dict[str, Path]) -> dict[str, Any]:
    from ...api import load

    teacher_lm = load(str(teacher_dir))
    teacher = teacher_lm.model.float().eval()
    tokenizer = teacher_lm.tokenizer
    search = Encoded(read_rows(files["search"]), tokenizer, cfg.seq_len)
    test_rows = read_rows(files["test"])
    test = Encoded(test_rows, tokenizer, cfg.seq_len)
    timed = Encoded(test_rows[:cfg.latency.examples], tokenizer, cfg.seq_len, cfg.latency.batch_size)
    report: dict[str, Any] = {"examples": {"train": _count(files["train"]), "search": len(search), "test": len(test)},
                              "teacher": {"test_accuracy": accuracy(teacher, test, None),
                                          "latency_ms": latency_ms(teacher, timed, None, cfg.latency.repeats),
                                          "flops_vs_student": None}}
    predictions: dict[str, dict[float, torch.Tensor]] = {}
    for variant, folder in students.items():
        model = load(str(folder)).model.float().eval()
        n = model.cfg.n_layers
        print(f"lad: {name}: length search for the {variant} student", file=sys.stderr)
        t0 = time.time()
        points = evolutionary_search(lambda r: accuracy(model, search, r), n, cfg.search.iterations,
                                     cfg.search.mutations, cfg.search.crossovers, cfg.seed,
                                     on_progress=lambda it, k: print(f"lad:   iteration {it}: {k} configurations "
                                                                     f"({time.time() - t0:.0f} s)", file=sys.stderr))
        full_ms = latency_ms(model, timed, None, cfg.latency.repeats)
        rows = []
        for budget in cfg.budgets:
            chosen = tuple([1.0] * n) if budget >= 1.0 else best_within(points, budget)  # 100 %: un-pruned
            constant = [budget] * n
            row = {"budget": budget, "constant": {"ratios": constant, "test_accuracy": accuracy(model, test, constant),
                                                   "flops": flops_ratio(model.cfg, model.cfg, test, constant)}}
            if chosen is not None:
                ms = latency_ms(model, timed, list(chosen), cfg.latency.repeats)
                predictions.setdefault(variant, {})[budget] = right = correct(model, test, list(chosen))
                searched = points[chosen] if chosen in points else accuracy(model, search, list(chosen))
                row["searched"] = {"ratios": list(chosen), "search_accuracy": searched,
                                   "test_accuracy": float(right.mean()),
                                   "tokens": token_budget(chosen),
                                   "flops": flops_ratio(model.cfg, model.cfg, test, list(chosen)),
                                   "latency_ms": ms, "speedup": full_ms / ms}
            rows.append(row)
        report[variant] = {"full_latency_ms": full_ms, "budgets": rows, "searched_configurations": len(points),
                           "front": [{"ratios": list(c), "tokens": token_budget(c), "search_accuracy": points[c]}
                                     for c in pareto_front(points)]}
    report["teacher"]["flops_vs_student"] = 1.0 / flops_ratio(model.cfg, teacher.cfg, test, None)
    if set(predictions) >= {"lad", "plain"}:  # LAD minus the baseline, per budget, on the same test examples
        report["lad_minus_plain"] = {str(b): paired_difference(predictions["lad"][b], predictions["plain"][b], cfg.seed)
                                     for b in predictions["lad"] if b in predictions["plain"]}
    return report


# ------------------------------------------------------------------------------------------------ the run
def run(cfg: LADConfig) -> dict:
    check_config(cfg)
    for name in cfg.datasets:
        if name.startswith("_"):
            raise SlmError(f"datasets: name {name!r} may not start with _")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    files = prepare_data(cfg, out)
    teachers = {name: train_teacher(cfg, name, files[name], out) for name in cfg.datasets}
    general = {v: general_distill(cfg, v, files["_corpus"]["train"], out) for v in VARIANT_NAMES}
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "datasets": {}}
    for name in cfg.datasets:
        students = {v: task_distill(cfg, name, v, general[v], teachers[name], files[name], out) for v in VARIANT_NAMES}
        report["datasets"][name] = evaluate_dataset(cfg, name, files[name], teachers[name], students)
        _report(out, report, started)
    report["complete"] = True
    _report(out, report, started)
    plot(report, out / "lad.png")
    return report


def _report(out: Path, report: dict, started: float) -> None:
    report["wall_seconds"] = round(time.time() - started, 1)
    write_atomically(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "results.md", tables(report))


def tables(report: dict) -> str:
    lines = []
    for name, ds in report["datasets"].items():
        t = ds["teacher"]
        lines += [f"### {name}", "",
                  f"Examples: {ds['examples']['train']} train, {ds['examples']['search']} search (held out of train), "
                  f"{ds['examples']['test']} test. Teacher: {100 * t['test_accuracy']:.1f} % test accuracy, "
                  f"{t['latency_ms']:.1f} ms per batch, {t['flops_vs_student']:.2f}x the student's FLOPs.", "",
                  "| tokens kept | student | searched config | search acc | test acc | FLOPs | ms / batch | speed-up "
                  "| constant schedule: test acc |", "|---|---|---|---|---|---|---|---|---|"]
        for variant in VARIANT_NAMES:
            if variant not in ds:
                continue
            for row in ds[variant]["budgets"]:
                s = row.get("searched")
                searched = ("| - | - | - | - | - | - " if s is None else
                            f"| {', '.join(f'{r:.2f}' for r in s['ratios'])} | {100 * s['search_accuracy']:.1f} "
                            f"| {100 * s['test_accuracy']:.1f} | {100 * s['flops']:.0f} % | {s['latency_ms']:.1f} "
                            f"| {s['speedup']:.2f}x ")
                lines.append(f"| {100 * row['budget']:.0f} % | {VARIANT_NAMES[variant]} {searched}"
                             f"| {100 * row['constant']['test_accuracy']:.1f} |")
        if "lad_minus_plain" in ds:
            lines += ["", "LAD minus KD-then-pruned, test accuracy at the searched configurations "
                      "(95 % paired bootstrap over the test examples):", "",
                      "| tokens kept | difference (points) | 95 % interval |", "|---|---|---|"]
            for budget, d in ds["lad_minus_plain"].items():
                lines.append(f"| {100 * float(budget):.0f} % | {100 * d['difference']:+.1f} "
                             f"| [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Test accuracy against FLOPs (relative to the un-pruned student) and against measured latency, for each
    dataset and student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        ds = report["datasets"][name]
        for row, (key, label) in enumerate((("flops", "FLOPs of the un-pruned student (%)"),
                                            ("latency_ms", "CPU latency per batch (ms)"))):
            ax = axes[row][col]
            scale = 100 if key == "flops" else 1
            for variant, style in (("lad", "o-"), ("plain", "s--")):
                points = [r["searched"] for r in ds.get(variant, {}).get("budgets", []) if "searched" in r]
                points.sort(key=lambda r: r[key])
                ax.plot([scale * r[key] for r in points], [100 * r["test_accuracy"] for r in points], style,
                        label=f"{VARIANT_NAMES[variant]} (searched)")
            ax.axhline(100 * ds["teacher"]["test_accuracy"], color="grey", linestyle=":", label="teacher")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["LADConfig", "load_config", "config_from_mapping", "check_config", "run", "tables"]
