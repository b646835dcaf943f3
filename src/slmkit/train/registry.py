"""The task registry: every training task (built-in or a method's) in one table.

A task is a name, a builder ``build(cfg, dist) -> RunParts`` and, optionally, its own config section: a
dataclass read from the top-level YAML key ``section`` with every key checked, as the built-in sections
are (``cfg.method`` holds the parsed section). ``slm train CONFIG.yaml`` runs whatever ``task:`` names.

A module registers its tasks when it is imported::

    from slmkit.train.registry import register_task

    register_task("toy", build_toy, section=ToySection, key="toy")

The built-in tasks live one per module in ``slmkit.train.tasks``; the seed's methods in ``slmkit.methods``.
Both packages are imported on the first lookup, so a method module registers itself just by being there.
Code elsewhere (a test, a user's script) registers by calling ``register_task`` before training.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ..errors import SlmError

DISCOVERED_PACKAGES = ("slmkit.train.tasks", "slmkit.methods")
BUILTIN_ORDER = ("pretrain", "sft", "span_corruption", "seq2seq", "mlm", "classify")  # how task lists read


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable  # (TrainConfig, Dist) -> RunParts
    section: type | None = None  # dataclass of the task's own config section (None: it has none)
    key: str | None = None  # top-level YAML key of that section (default: the task's name)
    pretraining: bool = False  # `slm pretrain` runs it (else `slm finetune`); `slm train` runs any task
    summary: str = ""


_TASKS: dict[str, Task] = {}
_discovered = False


def register_task(name: str, build: Callable, *, section: type | None = None, key: str | None = None,
                  pretraining: bool = False, summary: str = "", replace: bool = False) -> Task:
    """Add a task to the table (``replace=True`` to redefine one, e.g. in a test)."""
    if not name or not name.replace("_", "").isalnum():
        raise SlmError(f"task name {name!r}: use letters, digits and underscores")
    if section is not None and not dataclasses.is_dataclass(section):
        raise SlmError(f"task {name}: its config section must be a dataclass, got {section!r}")
    if name in _TASKS and not replace and _TASKS[name].build is not build:
        raise SlmError(f"task {name!r} is already registered (by {_TASKS[name].build.__module__})")
    task = Task(name, build, section, (key or name) if section is not None else None, pretraining, summary)
    _TASKS[name] = task
    return task


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def _discover() -> None:
    """Import the built-in task modules and the method modules once, so that they register themselves."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for package_name in DISCOVERED_PACKAGES:
        package = importlib.import_module(package_name)
        names = sorted((info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")),
                       key=lambda n: (BUILTIN_ORDER.index(n) if n in BUILTIN_ORDER else len(BUILTIN_ORDER), n))
        for name in names:
            importlib.import_module(f"{package_name}.{name}")


def get_task(name: str) -> Task:
    _discover()
    if name not in _TASKS:
        raise SlmError(f"task must be one of {', '.join(task_names())}, got {name!r}")
    return _TASKS[name]


def task_names() -> list[str]:
    """Every task: the built-in ones in their reading order, then the others as they were registered (a method
    module imported before the first lookup registers early, but still lists after the built-ins)."""
    _discover()
    order = {name: i for i, name in enumerate(BUILTIN_ORDER)}
    return sorted(_TASKS, key=lambda n: order.get(n, len(order)))
