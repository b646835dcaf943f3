"""A training run's metrics: ``metrics.csv`` plus TensorBoard scalars, written as the run goes.

``MetricsLogger(out_dir)`` writes ``out_dir/metrics.csv`` (columns ``COLUMNS``, one row per
``log(step, ...)`` call, empty cells for values not measured on that step) and TensorBoard event files in
``out_dir/tensorboard/`` (tags in ``TENSORBOARD_TAGS``). Every row and event is flushed as soon as it is
written, so a killed run keeps everything it logged.

A run resumed from a checkpoint at step k passes ``resume_step=k``: metrics.csv keeps its rows with
step <= k (rewritten atomically) and new rows are appended after them; the event file gets a SessionLog
START at step k+1, on which TensorBoard drops the old run's events for the steps that are redone.

``read_metrics(path)`` reads the CSV back as a list of dicts.
"""

from __future__ import annotations

import csv
import io
import operator
import os
import tempfile
import time
from pathlib import Path

from ..errors import SlmError
from .tensorboard import EventWriter

COLUMNS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "elapsed_s")
_INT_COLUMNS = frozenset({"step", "tokens"})
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_loss": "val/loss",
}
CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Writes ``metrics.csv`` and TensorBoard events for one training run in ``out_dir``.

    ``log(step, tokens=..., loss=..., lr=..., grad_norm=..., tokens_per_s=..., val_loss=..., elapsed_s=...)``
    once per logged step, with steps strictly increasing; every value is optional. When ``elapsed_s`` is
    not given it is filled in: seconds since this logger was created, plus, on a resume, the elapsed_s of
    the last row kept.
    """

    def __init__(self, out_dir: str | os.PathLike[str], resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / CSV_NAME
        self.tensorboard_dir = self.out_dir / TENSORBOARD_DIR

        kept: list[dict] = []
        if resume_step is not None:
            resume_step = _to_int("resume_step", resume_step)
            if resume_step < 0:
                raise SlmError(f"resume_step must be >= 0, got {resume_step}")
            if self.csv_path.exists():
                kept = [row for row in read_metrics(self.csv_path) if row["step"] <= resume_step]
        # A fresh run starts a new file; a resumed one keeps the rows up to its checkpoint.
        _write_atomically(self.csv_path, kept)

        self._last_step = kept[-1]["step"] if kept else None
        self._elapsed_before = next((r["elapsed_s"] for r in reversed(kept) if r["elapsed_s"] is not None), 0.0)
        self._started = time.monotonic()
        self._file = open(self.csv_path, "a", encoding="utf-8", newline="")
        self._events = EventWriter(self.tensorboard_dir)
        self._events.add_session_start(0 if resume_step is None else resume_step + 1)

    def log(self, step: int, **values) -> dict:
        """Append one row (and its TensorBoard scalars); returns the row as written, ``None`` for empty cells."""
        if self._file is None:
            raise SlmError(f"the metrics logger for {self.out_dir} is closed")
        unknown = sorted(set(values) - set(COLUMNS[1:]))
        if unknown:
            raise SlmError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(COLUMNS[1:])}")
        step = _to_int("step", step)
        if step < 0:
            raise SlmError(f"step must be >= 0, got {step}")
        if self._last_step is not None and step <= self._last_step:
            raise SlmError(f"step {step} logged after step {self._last_step}: steps must increase")

        if values.get("elapsed_s") is None:
            values["elapsed_s"] = self._elapsed_before + time.monotonic() - self._started
        row = {"step": step}
        for name in COLUMNS[1:]:
            value = values.get(name)
            if value is not None:
                value = _to_int(name, value) if name in _INT_COLUMNS else _to_float(name, value)
            row[name] = value

        self._file.write(_format_row(row))
        self._file.flush()
        self._last_step = step
        for name, tag in TENSORBOARD_TAGS.items():
            if row[name] is not None:
                self._events.add_scalar(tag, row[name], step)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._events.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict]:
    """The rows of a metrics.csv: ``step``/``tokens`` as int, the rest as float, empty cells as ``None``.

    A last line without its newline (a row being written when the run was killed) is left out.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlmError(f"no metrics file at {path}") from None
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(io.StringIO(text)))
    if not lines or tuple(lines[0]) != COLUMNS:
        found = ",".join(lines[0]) if lines else "nothing"
        raise SlmError(f"{path} is not a metrics file: its header is {found!r}, expected {','.join(COLUMNS)!r}")
    rows = []
    for line_no, cells in enumerate(lines[1:], start=2):
        if len(cells) != len(COLUMNS):
            raise SlmError(f"{path} line {line_no}: {len(cells)} cells, expected {len(COLUMNS)}")
        row = {}
        for name, cell in zip(COLUMNS, cells):
            try:
                row[name] = None if cell == "" else int(cell) if name in _INT_COLUMNS else float(cell)
            except ValueError:
                raise SlmError(f"{path} line {line_no}: {name} {cell!r} is not a number") from None
        if row["step"] is None:
            raise SlmError(f"{path} line {line_no}: the step is missing")
        rows.append(row)
    return rows


def _format_row(row: dict) -> str:
    cells = []
    for name in COLUMNS:
        value = row[name]
        cells.append("" if value is None else str(value) if name in _INT_COLUMNS else repr(value))
    return ",".join(cells) + "\n"


def _write_atomically(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(",".join(COLUMNS) + "\n")
            f.writelines(_format_row(row) for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_int(name: str, value) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise SlmError(f"{name} must be an integer, got {value!r}") from None


def _to_float(name: str, value) -> float:
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one element
        raise SlmError(f"{name} must be a number, got {value!r}") from None
    return value
