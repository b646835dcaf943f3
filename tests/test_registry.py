"""The house for methods, used from outside ``train/``: a toy task and objective registered in this file,
with its own config section, trained through the one Trainer with checkpoint and exact resume; and a
distillation objective whose frozen teacher is run but never trained nor checkpointed.

This file is the worked example of docs/adding-a-method.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.models.decoder import Decoder
from slmkit.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from slmkit.train.config import config_from_dict
from slmkit.train.metrics import read_metrics
from slmkit.train.objectives import DistillationLoss
from slmkit.train.registry import get_task, register_task, task_names, unregister_task
from slmkit.train.run import train
from slmkit.train.trainer import RunParts

VOCAB = 64


def tiny_decoder(seed: int, hidden: int = 32, layers: int = 2) -> Decoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=hidden, n_layers=layers, n_heads=4,
                      n_kv_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    return Decoder(cfg)


# ---------------------------------------------------------------- the toy method
@dataclass
class CountingSection:
    """The toy task's own config section (YAML key ``counting``)."""
    seq_len: int = 16
    step_size: int = 3  # each row counts up by this modulo the vocabulary
    label_smoothing: float = 0.0


class CountingBatches:
    """Rows that count up by ``step_size`` from a start drawn from the sample index: a pure function of the
    indices, as the Trainer's exact resume needs."""

    def __init__(self, section: CountingSection, offset: int = 0):
        self.section, self.offset = section, offset

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        s = self.section
        starts = torch.tensor([(7 * (k + self.offset)) % VOCAB for k in indices])
        rows = (starts[:, None] + s.step_size * torch.arange(s.seq_len + 1)) % VOCAB
        return {"input_ids": rows[:, :-1].clone(), "labels": rows[:, 1:].clone()}


class SmoothedLMLoss(nn.Module):
    """A toy objective: next-token cross-entropy with label smoothing, as (sum, count)."""

    def __init__(self, model: Decoder, smoothing: float):
        super().__init__()
        self.model, self.smoothing = model, smoothing

    def forward(self, input_ids, labels):
        logits = self.model(input_ids).float().flatten(0, 1)
        loss = F.cross_entropy(logits, labels.flatten(), label_smoothing=self.smoothing, reduction="sum")
        return loss, torch.tensor(labels.numel())


def build_counting(cfg, d) -> RunParts:
    section: CountingSection = cfg.method
    model = tiny_decoder(cfg.run.seed)
    out = Path(cfg.out_dir)

    def save(trained):
        state = trained if isinstance(trained, dict) else trained.state_dict()
        (out / "model").mkdir(parents=True, exist_ok=True)
        torch.save(state, out / "model" / "weights.pt")

    def evaluate(student) -> dict[str, float]:
        batch = CountingBatches(section, offset=10_000).batch(list(range(8)))
        predicted = student(batch["input_ids"]).argmax(-1)
        return {"next_token_accuracy": (predicted == batch["labels"]).float().mean().item()}

    return RunParts(model, CountingBatches(section), CountingBatches(section, offset=10_000), 8, save,
                    objective=SmoothedLMLoss(model, section.label_smoothing), blocks=list(model.layers),
                    evaluate=evaluate)


@pytest.fixture
def counting_task():
    register_task("counting", build_counting, section=CountingSection, summary="toy: count up")
    yield
    unregister_task("counting")


def config(out: Path, task: str, steps: int = 3, **extra) -> dict:
    return {"task": task, "out_dir": str(out),
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
            "run": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": steps, "eval_every": 2, "save_every": 1,
                    "keep_checkpoints": 5, "threads": 1, "progress": False},
            **extra}


def train_losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.csv") if row["loss"] is not None]


def redo_last_step(out: Path, raw: dict) -> None:
    """Drop the last checkpoint and the saved model, as if the run had died before its last step, and resume."""
    shutil.rmtree(latest_checkpoint(out / "checkpoints"))
    shutil.rmtree(out / "model")
    train(config_from_dict(raw), resume=True)


# ---------------------------------------------------------------- tests
def test_a_task_from_outside_train_registers_with_its_own_section(counting_task, tmp_path):
    assert "counting" in task_names() and get_task("counting").key == "counting"
    cfg = config_from_dict(config(tmp_path, "counting", counting={"step_size": 5}))
    assert cfg.method == CountingSection(step_size=5)
    assert cfg.to_dict()["counting"]["step_size"] == 5 and "method" not in cfg.to_dict()
    with pytest.raises(SlmError, match=r"unknown key\(s\) in counting: stride"):
        config_from_dict(config(tmp_path, "counting", counting={"stride": 5}))
    with pytest.raises(SlmError, match="unknown top-level key"):  # another task's section is not this one's
        config_from_dict(config(tmp_path, "pretrain", counting={"step_size": 5}))
    with pytest.raises(SlmError, match="task must be one of .*counting.*, got 'countin'"):
        config_from_dict(config(tmp_path, "countin"))


def test_the_builtin_tasks_are_registered_in_their_order():
    assert task_names()[:6] == ["pretrain", "sft", "span_corruption", "seq2seq", "mlm", "classify"]
    assert [n for n in task_names() if get_task(n).pretraining][:3] == ["pretrain", "span_corruption", "mlm"]


def test_toy_task_trains_checkpoints_and_resumes_exactly(counting_task, tmp_path):
    raw = config(tmp_path / "run", "counting", counting={"label_smoothing": 0.1})
    result = train(config_from_dict(raw))
    assert result.steps == 3 and (tmp_path / "run" / "model" / "weights.pt").is_file()
    straight = train_losses(tmp_path / "run")
    assert len(straight) == 3 and straight[-1] < straight[0]
    evaluations = (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in evaluations]
    assert [row["step"] for row in rows] == [2, 3]  # every eval_every steps, and at the end
    assert all(0.0 <= row["next_token_accuracy"] <= 1.0 for row in rows)
    assert len(list_checkpoints(tmp_path / "run" / "checkpoints")) == 3

    redo_last_step(tmp_path / "run", raw)
    resumed = train_losses(tmp_path / "run")
    assert len(resumed) == 3
    resumed_rows = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    assert resumed_rows == rows, "the redone step's evaluation replaces the old one, as in metrics.csv"
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=0, atol=1e-6)


@dataclass
class DistillSection:
    temperature: float = 2.0
    alpha: float = 0.7


def build_distill(cfg, d) -> RunParts:
    section = cfg.method
    student, teacher = tiny_decoder(1, hidden=32), tiny_decoder(2, hidden=48, layers=3)
    objective = DistillationLoss(student, teacher, section.temperature, section.alpha)
    source = CountingBatches(CountingSection())
    out = Path(cfg.out_dir)

    def save(trained):  # the module, or its state dict gathered from the ranks of a distributed run
        (out / "model").mkdir(parents=True, exist_ok=True)
        torch.save(trained if isinstance(trained, dict) else trained.state_dict(), out / "model" / "student.pt")

    return RunParts(student, source, None, 0, save, objective=objective, frozen=[teacher])


DISTRIBUTED_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_registry import DistillSection, build_distill
from slmkit.train.config import load_config
from slmkit.train.registry import register_task
from slmkit.train.run import train
register_task("toy_distill", build_distill, section=DistillSection, key="distill")
train(load_config(sys.argv[1]))
"""


def test_distillation_with_a_frozen_teacher_checkpoints_the_student_only(tmp_path):
    register_task("toy_distill", build_distill, section=DistillSection, key="distill")
    try:
        raw = config(tmp_path / "run", "toy_distill", distill={"temperature": 2.0, "alpha": 0.7})
        teacher_before = {k: v.clone() for k, v in tiny_decoder(2, hidden=48, layers=3).state_dict().items()}
        cfg = config_from_dict(raw)
        parts = build_distill(cfg, None)
        teacher = parts.frozen[0]
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())

        train(cfg)
        straight = train_losses(tmp_path / "run")
        assert len(straight) == 3 and straight[-1] < straight[0]
        state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
        student_keys = {f"model.{k}" for k in tiny_decoder(1).state_dict()}
        assert set(state["model"]) == student_keys, "the checkpoint holds the student, nothing of the teacher"
        saved = torch.load(tmp_path / "run" / "model" / "student.pt")
        assert set(saved) == {k.removeprefix("model.") for k in student_keys}

        redo_last_step(tmp_path / "run", raw)
        torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "run")), torch.tensor(straight),
                                   rtol=0, atol=1e-6)
    finally:
        unregister_task("toy_distill")


def test_the_trainer_keeps_the_teacher_frozen_and_in_eval_mode(tmp_path):
    """Inside one Trainer: the teacher gets no gradient, no optimizer slot, stays in eval mode (dropout off)
    and its weights do not move."""
    from slmkit.train.distributed import Dist
    from slmkit.train.trainer import Trainer

    register_task("toy_distill", build_distill, section=DistillSection, key="distill", replace=True)
    try:
        cfg = config_from_dict(config(tmp_path / "run", "toy_distill", steps=2))
        parts = build_distill(cfg, None)
        teacher = parts.frozen[0]
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        trainer = Trainer(parts.model, parts.train, cfg, Dist(), objective=parts.objective, frozen=parts.frozen)
        optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in optimized for p in teacher.parameters())
        assert trainer.train_step(0)[0] > 0
        trainer._train_mode()
        assert parts.model.training and not teacher.training
        assert all(p.grad is None for p in teacher.parameters())
        trainer.train_step(1)
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    finally:
        unregister_task("toy_distill")


def test_distillation_loss_is_its_formula():
    """alpha T^2 KL(teacher^T || student^T) + (1 - alpha) CE, summed over the target positions."""
    student, teacher = tiny_decoder(1), tiny_decoder(2)
    batch = CountingBatches(CountingSection(seq_len=8)).batch([0, 1])
    batch["labels"][0, :3] = -100
    loss, count = DistillationLoss(student, teacher, temperature=3.0, alpha=0.25)(**batch)
    keep = batch["labels"].flatten() != -100
    s = student(batch["input_ids"]).flatten(0, 1)[keep].float()
    with torch.no_grad():
        t = teacher(batch["input_ids"]).flatten(0, 1)[keep].float()
    kl = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), log_target=True, reduction="sum") * 9
    ce = F.cross_entropy(s, batch["labels"].flatten()[keep], reduction="sum")
    assert int(count) == int(keep.sum()) == 13
    torch.testing.assert_close(loss, 0.25 * kl + 0.75 * ce, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distillation_on_two_ranks_follows_one_process(tmp_path, mode):
    """Under torchrun the teacher is left out of DDP / FSDP (a full copy per rank, never synchronised or
    sharded): two ranks give the single process's losses and the same student, and the gathered state dict
    holds the student only."""
    import os
    import subprocess
    import sys

    import yaml

    register_task("toy_distill", build_distill, section=DistillSection, key="distill", replace=True)
    try:
        train(config_from_dict(config(tmp_path / "one", "toy_distill", steps=4)))
    finally:
        unregister_task("toy_distill")
    raw = config(tmp_path / "two", "toy_distill", steps=4)
    raw["run"].update(grad_accum=1, distributed=mode)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    script = tmp_path / "run_distill.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(tests=str(Path(__file__).parent)))
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "two.yaml")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "two")), torch.tensor(train_losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-5)
    one = torch.load(tmp_path / "one" / "model" / "student.pt")
    two = torch.load(tmp_path / "two" / "model" / "student.pt")
    assert one.keys() == two.keys() == tiny_decoder(1).state_dict().keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    state = load_checkpoint(latest_checkpoint(tmp_path / "two" / "checkpoints"))
    assert not any(k.startswith("teacher.") for k in state["model"])
