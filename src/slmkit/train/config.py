"""Training configuration: one YAML file per run, read into dataclasses with every key checked.

A config has five sections — ``model``, ``data``, ``optim``, ``run`` and (for LoRA) ``lora`` — plus
``task`` (any task in ``slmkit.train.registry``) and ``out_dir``; a task that declares its own section
(a method's settings) reads it from the top-level key it registered, into ``cfg.method``. Unknown keys
are errors, so a typo never silently falls back to a default. ``--set section.key=value`` on the command
line overrides any value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import SlmError
from .registry import get_task

PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the hardware has it natively (train/precision.py)


@dataclass
class ModelSection:
    init: str = "scratch"  # "scratch" or a model to start from (registry name, .gguf, HF folder)
    config: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields for a scratch model
    tokenizer: str | None = None  # tokenizer folder for a scratch model (trained here when absent)
    tokenizer_vocab_size: int = 8192  # BPE vocabulary when the tokenizer is trained for this run
    init_std: float = 0.02  # normal init of every matrix in a scratch model
    num_labels: int = 2  # classify: classes of the classification head
    labels: list[str] = field(default_factory=list)  # classify: class names by index (for string labels)


@dataclass
class DataSection:
    corpus: list[str] = field(default_factory=list)  # pretrain: text / jsonl files or folders
    text_field: str = "text"
    shards: str | None = None  # pretrain: prepared token shards (made from `corpus` when absent)
    chat: str | None = None  # sft: instruction / conversation file
    system: str | None = None  # sft: optional system message for every conversation
    pack: bool = True  # sft: pack conversations into rows of seq_len, each attending only to itself
    seq_len: int = 256
    document_mask: bool = False  # pretrain: attention stops at document boundaries inside a packed window
    val_fraction: float = 0.01
    workers: int = 2  # tokenization processes
    noise_density: float = 0.15  # span_corruption: fraction of tokens dropped (data.seq_len = encoder tokens)
    mean_span_length: float = 3.0  # span_corruption: mean length of a dropped span
    train_file: str | list[str] | None = None  # seq2seq: .jsonl of {input, target}; classify: labelled files
    val_file: str | None = None  # seq2seq, classify: held-out records (else val_fraction of train_file)
    input_field: str = "input"  # seq2seq: record field of the source text
    target_field: str = "target"  # seq2seq: record field of the target text
    target_len: int = 128  # seq2seq: longest target in tokens, EOS included (data.seq_len: longest input)
    text_column: str | None = None  # classify: text field / column (default: sentence or text)
    label_column: str = "label"  # classify: label field / column
    mask_prob: float = 0.15  # mlm: fraction of the non-special tokens masked


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = no clipping
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays to min_lr


@dataclass
class RunSection:
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 0  # 0 -> from max_tokens
    max_tokens: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay fp32) | auto (bf16 where native)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 0
    threads: int = 0  # 0 -> every core
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 2
    distributed: str = "ddp"  # under torchrun: ddp | fsdp
    device: str = "auto"  # auto (a CUDA GPU when there is one) | cpu | cuda
    progress: bool = True


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])


@dataclass
class TrainConfig:
    task: str = "pretrain"  # a registered task (slmkit.train.registry)
    out_dir: str = "runs/run"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    lora: LoraSection | None = None
    method: Any = None  # the task's own section (an instance of its registered dataclass), if it has one

    def __post_init__(self):
        try:
            task = get_task(self.task)
        except SlmError as exc:  # an unknown task: the error names the known ones
            raise SlmError(f"config: {exc}") from None
        if task.section is not None and self.method is None:
            self.method = task.section()
        checks = [
            (self.optim.schedule in ("cosine", "wsd", "constant"),
             f"optim.schedule must be cosine, wsd or constant, got {self.optim.schedule!r}"),
            (self.run.precision in PRECISIONS,
             f"run.precision must be fp32, bf16 or auto, got {self.run.precision!r}"),
            (self.run.distributed in ("ddp", "fsdp"), f"run.distributed must be ddp or fsdp, got {self.run.distributed!r}"),
            (self.run.device in ("cpu", "cuda", "auto"), f"run.device must be cpu, cuda or auto, got {self.run.device!r}"),
            (self.run.micro_batch_size >= 1 and self.run.grad_accum >= 1, "micro_batch_size and grad_accum must be >= 1"),
            (self.run.max_steps > 0 or self.run.max_tokens > 0, "set run.max_steps or run.max_tokens"),
            (self.data.seq_len >= 2, "data.seq_len must be >= 2"),
            (0 <= self.optim.decay_fraction <= 1, "optim.decay_fraction must be within [0, 1]"),
            (0 < self.data.mask_prob < 1, "data.mask_prob must be between 0 and 1 (exclusive)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SlmError(f"config: {message}")

    def to_dict(self) -> dict[str, Any]:
        """The config as its YAML would hold it (the task's own section under its key)."""
        out = dataclasses.asdict(self)
        method = out.pop("method")
        if method is not None:
            out[get_task(self.task).key] = method
        return out


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection,
             "lora": LoraSection}


def parse_section(cls, values: Any, name: str):
    """A config section (a mapping) as the dataclass ``cls``; unknown keys are an error naming them."""
    if values is None:
        return None if name == "lora" else cls()
    if not isinstance(values, dict):
        raise SlmError(f"config: section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SlmError(f"config: unknown key(s) in {name}: {', '.join(unknown)} (known: {', '.join(known)})")
    if "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    if not isinstance(raw, dict):
        raise SlmError("config: the file must hold a mapping of sections")
    name = raw.get("task", "pretrain")
    if not isinstance(name, str):
        raise SlmError(f"config: task must be a task name, got {name!r}")
    try:
        task = get_task(name)
    except SlmError as exc:
        raise SlmError(f"config: {exc}") from None
    top = {"task", "out_dir", *_SECTIONS, *([task.key] if task.section is not None else [])}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise SlmError(f"config: unknown top-level key(s): {', '.join(unknown)} (known: {', '.join(sorted(top))})")
    sections = {name: parse_section(cls, raw.get(name), name) for name, cls in _SECTIONS.items()}
    if task.section is not None:
        sections["method"] = parse_section(task.section, raw.get(task.key), task.key)
    try:
        return TrainConfig(task=name, out_dir=str(raw.get("out_dir", "runs/run")), **sections)
    except TypeError as exc:
        raise SlmError(f"config: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` strings (value parsed as YAML) applied to a raw config mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SlmError(f"--set expects section.key=value, got {item!r}")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SlmError(f"--set {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def read_config_file(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML config file as a mapping, with ``--set`` overrides applied; a missing or malformed file is a
    SlmError naming it."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SlmError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return apply_overrides(raw, overrides or [])


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return config_from_dict(read_config_file(path, overrides))
