"""LAD's two training stages as tasks of the one Trainer: ``lad_general`` (stage 1: a student built from
some of the teacher's layers, distilled on unlabeled text) and ``lad_task`` (stage 2: that student with a
classification head, distilled from a fine-tuned teacher). ``variant: plain`` gives the baseline of each."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SlmError
from ...models.encoder import EncoderModel
from ...train.encoder_tasks import (check_encoder_run, classification_metrics, classification_sources, encoder_saver,
                                    encoder_to_train, encoder_vocab, load_encoder_to_train)
from ...train.registry import register_task
from ...train.trainer import RunParts
from .objectives import VARIANTS, GeneralDistillLoss, TaskDistillLoss


@dataclass
class GeneralSection:
    teacher: str = "all-minilm-l6-v2"  # a BERT / RoBERTa checkpoint (folder or packaged name)
    student_layers: list[int] = field(default_factory=lambda: [0, 2, 4, 5])  # teacher layers the student starts from
    variant: str = "lad"  # lad | plain (L_full only: ordinary distillation)
    drop_bounds: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    queue_size: int = 4096
    tau: float = 0.07
    weight: float = 0.5  # on L_align + L_recon


@dataclass
class TaskSection:
    teacher: str = ""  # the fine-tuned teacher (a *ForSequenceClassification folder)
    variant: str = "lad"  # lad | plain (KD of the un-pruned student only)
    drop_bounds: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    sub_models: int = 2  # pruned sub-models per step (the smallest, then random ones)
    temperature: float = 1.0
    ce_weight: float = 1.0
    queue_size: int = 4096
    tau: float = 0.07


def _check_section(section, name: str) -> None:
    if section.variant not in VARIANTS:
        raise SlmError(f"config: {name}.variant must be one of {', '.join(VARIANTS)}, got {section.variant!r}")
    if not section.drop_bounds or any(not 0.0 <= float(p) < 1.0 for p in section.drop_bounds):
        raise SlmError(f"config: {name}.drop_bounds must be a list of numbers in [0, 1), got {section.drop_bounds!r}")


def student_from_layers(teacher: EncoderModel, layers: list[int]) -> EncoderModel:
    """An encoder with the teacher's embeddings and its ``layers`` (in order), no heads."""
    if not layers or layers != sorted(set(layers)) or layers[-1] >= teacher.cfg.n_layers or layers[0] < 0:
        raise SlmError(f"student_layers must be increasing indices below the teacher's {teacher.cfg.n_layers} "
                       f"layers, got {layers!r}")
    cfg = dataclasses.replace(teacher.cfg, n_layers=len(layers))
    student = EncoderModel(cfg, ())
    student.encoder.embeddings.load_state_dict(teacher.encoder.embeddings.state_dict())
    for i, source in enumerate(layers):
        student.encoder.layers[i].load_state_dict(teacher.encoder.layers[source].state_dict())
    return student


def build_general(cfg, d) -> RunParts:
    check_encoder_run(cfg)
    section: GeneralSection = cfg.method
    _check_section(section, "lad_general")
    cfg.model.init = section.teacher
    lm = load_encoder_to_train(cfg)
    teacher = lm.model.float().eval().requires_grad_(False)
    vocab = encoder_vocab(Path(lm.source))
    student = student_from_layers(teacher, list(section.student_layers)).train()
    train, val, n_val = classification_sources(cfg, vocab, min(cfg.data.seq_len, teacher.cfg.max_tokens))
    objective = GeneralDistillLoss(student, teacher, section.variant, section.drop_bounds, section.queue_size,
                                   section.tau, section.weight, vocab.mask_id, cfg.run.seed)
    return RunParts(student, train, val, n_val, encoder_saver(cfg, student.cfg, (), vocab), objective=objective,
                    blocks=list(student.encoder.layers), frozen=[teacher])


def build_task(cfg, d) -> RunParts:
    check_encoder_run(cfg)
    section: TaskSection = cfg.method
    _check_section(section, "lad_task")
    if not section.teacher:
        raise SlmError("config: lad_task.teacher must name the fine-tuned teacher's folder")
    if section.sub_models < 1:
        raise SlmError(f"config: lad_task.sub_models must be >= 1, got {section.sub_models}")
    student, vocab = encoder_to_train(cfg, d, ("classifier",))
    from ...api import load

    teacher_lm = load(section.teacher)
    teacher = getattr(teacher_lm, "model", None)
    if not isinstance(teacher, EncoderModel) or teacher.classifier is None:
        raise SlmError(f"lad_task.teacher: {section.teacher} is not an encoder with a classification head")
    teacher = teacher.float().eval().requires_grad_(False)
    train, val, n_val = classification_sources(cfg, vocab, min(cfg.data.seq_len, student.cfg.max_tokens))
    objective = TaskDistillLoss(student, teacher, section.variant, section.drop_bounds, section.sub_models,
                                section.temperature, section.ce_weight, section.queue_size, section.tau,
                                cfg.run.seed)

    def write_eval(module: EncoderModel) -> None:
        result = {"val_file": cfg.data.val_file, **classification_metrics(module, val, cfg.run.micro_batch_size)}
        (Path(cfg.out_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")

    def evaluate(module: EncoderModel) -> dict[str, float]:
        return {"accuracy": classification_metrics(module, val, cfg.run.micro_batch_size)["accuracy"]}

    return RunParts(student, train, val, n_val, encoder_saver(cfg, student.cfg, ("classifier",), vocab, after=write_eval),
                    objective=objective, blocks=list(student.encoder.layers), frozen=[teacher], evaluate=evaluate)


register_task("lad_general", build_general, section=GeneralSection, key="lad_general",
              summary="LAD stage 1: a student from the teacher's layers, distilled under token pruning")
register_task("lad_task", build_task, section=TaskSection, key="lad_task",
              summary="LAD stage 2: task distillation from a fine-tuned teacher under token pruning")
