"""A task is data: a YAML file naming the data file, the prompt template, the answer and the metrics.

Templates are Jinja2 over one record's fields (``"{{ query }}\\nAnswer:"``); ``choices``, ``target``,
``contexts`` and ``answer`` are Jinja2 *expressions* (``gold``, ``label | int``,
``{'entailment': 0, 'not_entailment': 1}[label]``) or, for ``choices``, a literal list of label words;
``doc`` is the whole record (``doc['Class Index']``).
The built-in tasks live in ``slmkit/eval/tasks/*.yaml``; a path to any YAML file of the same shape
works wherever a task name does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ..errors import SlmError

TASKS_DIR = Path(__file__).parent / "tasks"
KINDS = ("multiple_choice", "classification", "generate", "loglikelihood", "perplexity")
METRICS = {
    "multiple_choice": {"acc", "acc_norm"},
    "classification": {"acc", "acc_norm", "macro_f1"},
    "generate": {"exact_match"},
    "loglikelihood": {"acc", "perplexity"},
    "perplexity": {"word_perplexity", "token_perplexity", "byte_perplexity", "bits_per_byte"},
}
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


class TaskError(SlmError):
    """A task definition is unknown or malformed, or a record lacks a field its templates use."""


@dataclass
class DataSpec:
    path: str
    format: str = "jsonl"
    encoding: str = "utf-8"
    pattern: str | None = None  # 'lines' format: a regex with named groups
    separator: str | None = None  # 'documents' format: a regex matching a document's first line


@dataclass
class Extraction:
    """Pull the answer out of generated text: ``regex`` matches, ``group_select`` picks one (-1 = last)."""
    name: str
    regex: str
    group_select: int = 0
    fallback: str = "[invalid]"


@dataclass
class Task:
    name: str
    kind: str
    data: DataSpec
    prompt: str = "{{ query }}"
    description: str = ""  # rendered once before the few-shot examples (e.g. MMLU's subject line)
    choices: str | list[str] | None = None  # expression or literal list
    contexts: str | None = None  # partial scoring (Winogrande): one context per option, one continuation
    continuation: str | None = None
    target: str | None = None  # expression: index of the right choice, or the continuation (loglikelihood)
    answer: str | None = None  # generate: expression giving the reference answer text
    fewshot_target: str | None = None  # generate: what follows a few-shot example's prompt
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_data: DataSpec | None = None
    fewshot_sampler: str = "random"  # random (seeded, per item) or first_n
    fewshot_group_by: str | None = None  # draw shots only from records with the same value here (MMLU subject)
    num_fewshot: int = 0
    metrics: list[str] = field(default_factory=list)
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 256
    extract: list[Extraction] = field(default_factory=list)
    ignore_case: bool = False
    regexes_to_ignore: list[str] = field(default_factory=list)
    text: str = "text"  # perplexity: expression giving a document's text
    detokenize: str | None = None  # perplexity: a named text cleaner (see metrics.DETOKENIZERS)
    source: str = ""  # where the prompt format comes from (for the report)
    classifier_input: str | None = None  # encoders: template of the text the classification head reads

    # --------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "<dict>") -> "Task":
        if not isinstance(raw, dict):
            raise TaskError(f"{origin}: a task definition must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TaskError(f"{origin}: unknown task field(s) {', '.join(unknown)}")
        for required in ("name", "kind", "data"):
            if required not in raw:
                raise TaskError(f"{origin}: the task needs a '{required}' field")
        raw = dict(raw)
        raw["data"] = _data_spec(raw["data"], origin)
        if raw.get("fewshot_data") is not None:
            raw["fewshot_data"] = _data_spec(raw["fewshot_data"], origin)
        raw["extract"] = [Extraction(**e) for e in raw.get("extract", [])]
        task = cls(**raw)
        task.validate(origin)
        return task

    def validate(self, origin: str) -> None:
        if self.kind not in KINDS:
            raise TaskError(f"{origin}: unknown kind {self.kind!r} (choose from {', '.join(KINDS)})")
        if not self.metrics:
            self.metrics = sorted(METRICS[self.kind] - {"macro_f1"}) if self.kind != "classification" \
                else ["acc", "macro_f1"]
        bad = sorted(set(self.metrics) - METRICS[self.kind])
        if bad:
            raise TaskError(f"{origin}: metric(s) {', '.join(bad)} do not apply to a {self.kind} task "
                            f"(choose from {', '.join(sorted(METRICS[self.kind]))})")
        needs = {"multiple_choice": ("target",), "classification": ("choices", "target"),
                 "generate": ("answer",), "loglikelihood": ("target",), "perplexity": ()}[self.kind]
        for name in needs:
            if getattr(self, name) is None:
                raise TaskError(f"{origin}: a {self.kind} task needs '{name}'")
        if self.kind in ("multiple_choice", "classification") and self.choices is None and self.contexts is None:
            raise TaskError(f"{origin}: a {self.kind} task needs 'choices' (or 'contexts' for partial scoring)")
        if self.contexts is not None and self.continuation is None:
            raise TaskError(f"{origin}: partial scoring ('contexts') needs a 'continuation'")
        if self.num_fewshot < 0:
            raise TaskError(f"{origin}: num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.fewshot_sampler not in ("random", "first_n"):
            raise TaskError(f"{origin}: fewshot_sampler must be 'random' or 'first_n'")
        try:  # compile every template now, so a typo fails before the model runs
            self._templates
        except jinja2.TemplateSyntaxError as e:
            raise TaskError(f"{origin}: template syntax error: {e.message}") from None

    # ------------------------------------------------------------- rendering
    @cached_property
    def _templates(self) -> dict[str, Any]:
        compiled: dict[str, Any] = {"prompt": _ENV.from_string(self.prompt),
                                    "description": _ENV.from_string(self.description)}
        if self.classifier_input is not None:
            compiled["classifier_input"] = _ENV.from_string(self.classifier_input)
        for name in ("target", "answer", "fewshot_target", "contexts", "continuation", "text"):
            if getattr(self, name) is not None:
                compiled[name] = _ENV.compile_expression(getattr(self, name))
        if isinstance(self.choices, str):
            compiled["choices"] = _ENV.compile_expression(self.choices)
        return compiled

    def _eval(self, name: str, doc: dict) -> Any:
        try:
            fn = self._templates[name]
            scope = {**doc, "doc": doc}  # ``doc['Class Index']`` reaches fields that are not identifiers
            return fn.render(**scope) if isinstance(fn, jinja2.Template) else fn(**scope)
        except jinja2.UndefinedError as e:
            raise TaskError(f"task {self.name}: {name} uses a field the data does not have ({e.message}); "
                            f"record fields: {', '.join(doc)}") from None
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise TaskError(f"task {self.name}: cannot evaluate {name} on a record: {e!r}") from None

    def prompt_text(self, doc: dict) -> str:
        return self._eval("prompt", doc)

    def classifier_text(self, doc: dict) -> str:
        """What an encoder's classification head reads: ``classifier_input``, else the prompt."""
        return self._eval("classifier_input" if self.classifier_input is not None else "prompt", doc)

    def description_text(self, doc: dict) -> str:
        return self._eval("description", doc)

    def choice_list(self, doc: dict) -> list[str]:
        if self.contexts is not None:
            return [str(c) for c in self._eval("contexts", doc)]
        values = self.choices if isinstance(self.choices, list) else self._eval("choices", doc)
        if not isinstance(values, (list, tuple)) or not values:
            raise TaskError(f"task {self.name}: choices must give a non-empty list, got {values!r}")
        return [str(c) for c in values]

    def target_index(self, doc: dict, n_choices: int) -> int:
        value = self._eval("target", doc)
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            choices = self.choice_list(doc)
            if value not in choices:
                raise TaskError(f"task {self.name}: target {value!r} is not one of the choices {choices}")
            return choices.index(value)
        index = int(value)
        if not 0 <= index < n_choices:
            raise TaskError(f"task {self.name}: target index {index} is outside the {n_choices} choices")
        return index

    def target_text(self, doc: dict) -> str:
        return str(self._eval("target", doc))

    def answer_text(self, doc: dict) -> str:
        return str(self._eval("answer", doc))

    def fewshot_answer(self, doc: dict) -> str:
        """The text that completes a few-shot example (after ``target_delimiter``)."""
        if self.kind == "generate":
            return str(self._eval("fewshot_target" if self.fewshot_target else "answer", doc))
        if self.kind == "loglikelihood":
            return self.target_text(doc)
        if self.contexts is not None:
            return str(self._eval("continuation", doc))
        choices = self.choice_list(doc)
        return choices[self.target_index(doc, len(choices))]

    def fewshot_question(self, doc: dict) -> str:
        """The prompt part of a few-shot example (Winogrande: the right option's context)."""
        if self.contexts is not None:
            options = self.choice_list(doc)
            return options[self.target_index(doc, len(options))]
        return self.prompt_text(doc)

    def continuation_text(self, doc: dict) -> str:
        return str(self._eval("continuation", doc))

    def document_text(self, doc: dict) -> str:
        return str(self._eval("text", doc))


def _data_spec(raw: Any, origin: str) -> DataSpec:
    if isinstance(raw, str):
        return DataSpec(path=raw)
    if not isinstance(raw, dict) or "path" not in raw:
        raise TaskError(f"{origin}: 'data' must be a path or a mapping with a 'path'")
    try:
        return DataSpec(**raw)
    except TypeError as e:
        raise TaskError(f"{origin}: bad 'data' entry: {e}") from None


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(name_or_path: str | Path, **overrides) -> Task:
    """A built-in task by name, or a task YAML file by path; ``overrides`` replace fields (``num_fewshot=5``)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TASKS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TaskError(f"unknown task {str(name_or_path)!r}; built-in tasks: {', '.join(builtin_tasks())} "
                            f"(or give the path of a task .yaml file)")
    elif not path.is_file():
        raise TaskError(f"{path}: task file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise TaskError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    if isinstance(raw, dict):
        raw.update({k: v for k, v in overrides.items() if v is not None})
    return Task.from_dict(raw, str(path))
