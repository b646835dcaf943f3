"""``evaluate``: run several tasks on a model and write one JSON report (summary plus sample records)."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..errors import SlmError
from .data import check_file
from .runner import Evaluator
from .task import Task, load_task


def evaluate(model, tasks: Sequence[str | Task], *, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16, seed: int = 1234, max_length: int | None = None,
             data_dir: str | Path | None = None, output: str | Path | None = None,
             progress: bool = True, prefix_lm: bool = False, lead: str | None = None) -> dict[str, Any]:
    """Score ``tasks`` (names, YAML paths or Task objects) on ``model`` (an ``slmkit.LM`` or a name/path
    for ``slmkit.load``). Returns ``{"config", "results", "samples"}``; with ``output`` also writes it.
    ``prefix_lm``: contexts attended in both directions (a UL2R model); ``lead``: a token put before each
    context (its mode token, e.g. ``[S2S]``)."""
    loaded = check_inputs(tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                          data_dir=data_dir, output=output)
    if isinstance(model, (str, Path)):
        from ..api import load
        model = load(model)
    names = [t.name for t in loaded]
    evaluator = Evaluator(model, batch_size=batch_size, max_length=max_length, seed=seed, data_dir=data_dir,
                          progress=progress, prefix_lm=prefix_lm, lead=lead)
    report: dict[str, Any] = {
        "config": {"model": model.source, "dtype": str(model.model.dtype).replace("torch.", ""),
                   "quant": getattr(model.model, "quant", "none"),  # encoders have no compact form
                   "tasks": names, "limit": limit, "num_fewshot": num_fewshot,
                   "batch_size": batch_size, "seed": seed, "max_length": evaluator.max_length,
                   "prefix_lm": prefix_lm, "lead": lead,
                   "data_dir": str(data_dir) if data_dir else os.environ.get("SLMKIT_DATA"),
                   "slmkit": __version__, "python": platform.python_version()},
        "results": {}, "samples": {},
    }
    for task in loaded:
        started = time.perf_counter()
        out = evaluator.run(task, limit=limit, num_fewshot=num_fewshot)
        out["result"]["seconds"] = round(time.perf_counter() - started, 2)
        out["result"]["source"] = task.source
        report["results"][task.name] = out["result"]
        report["samples"][task.name] = out["samples"]
    if output is not None:
        write_json(Path(output), report)
    return report


def check_inputs(tasks: Sequence[str | Task], *, limit: int | None = None, num_fewshot: int | None = None,
                 batch_size: int = 16, data_dir: str | Path | None = None,
                 output: str | Path | None = None) -> list[Task]:
    """Every mistake that can be found without the model: tasks, data files, numbers, the output path."""
    if not tasks:
        raise SlmError("no tasks given")
    loaded = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):
        raise SlmError(f"a task is listed twice: {', '.join(names)}")
    if limit is not None and limit < 1:
        raise SlmError(f"limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise SlmError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise SlmError(f"batch size must be >= 1, got {batch_size}")
    for task in loaded:
        for spec in (task.data, task.fewshot_data):
            if spec is not None:
                check_file(spec.path, data_dir)
    if output is not None:
        path = Path(output)
        if path.is_dir():
            raise SlmError(f"{path} is a folder; give a file name for the results")
        if not path.parent.exists():
            raise SlmError(f"{path.parent}: folder does not exist")
    return loaded


def write_json(path: Path, report: dict) -> None:
    """Write atomically: a crash never leaves a half-written results file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_table(report: dict) -> str:
    """A plain-text summary: one line per task and metric, with the standard error."""
    lines = [f"{'task':<16} {'n':>6} {'shots':>5}  {'metric':<24} {'value':>10} {'± stderr':>10}"]
    for name, res in report["results"].items():
        metrics = [k for k in res if k + "_stderr" in res]
        for i, m in enumerate(metrics):
            value, err = res[m], res[m + "_stderr"]
            pct = m.startswith(("acc", "exact_match", "macro_f1"))
            shown = f"{100 * value:.2f}" if pct else f"{value:.4f}"
            shown_err = "" if math.isnan(err) else (f"{100 * err:.2f}" if pct else f"{err:.4f}")
            head = (name, str(res["n"]), str(res["num_fewshot"])) if i == 0 else ("", "", "")
            lines.append(f"{head[0]:<16} {head[1]:>6} {head[2]:>5}  {m:<24} {shown:>10} {shown_err:>10}")
    return "\n".join(lines)
