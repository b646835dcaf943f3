"""Evaluation harness: tasks declared as YAML data, scored like lm-evaluation-harness scores them.

``slmkit.eval.evaluate(lm, ["arc_easy", "piqa"], limit=100)`` or ``slm eval MODEL --tasks arc_easy,piqa``.
"""

from .harness import evaluate, format_table
from .task import Task, builtin_tasks, load_task

__all__ = ["evaluate", "format_table", "Task", "builtin_tasks", "load_task"]
