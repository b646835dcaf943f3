"""FLAN's instruction templates, read as data from the FLAN repository's own files.

``load_patterns(path)`` reads the ``PATTERNS = {...}`` dictionary of ``flan/templates.py`` (FLAN 2021) or
``flan/v2/templates.py`` (the Flan Collection, which adds the chain-of-thought sets) with ``ast``: the file
is parsed, never executed. Each dataset maps to ten ``(input, output)`` pairs in Python ``str.format``
style; ``{options_}`` is the OPTIONS suffix (``format_options``). A template whose output is not
``{answer}`` "turns the task around" (RTE: "Generate a context and a hypothesis." -> the premise).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ...errors import SlmError

V1_FILE = "flan/flan_v1_templates.py"  # relative to the data folder
V2_FILE = "flan/flan_v2_templates.py"
_FIELD = re.compile(r"{(\w*)}")


@dataclass(frozen=True)
class Template:
    """One FLAN template of a dataset: ``index`` is its position in the dataset's list (0-9)."""
    dataset: str
    index: int
    input: str
    output: str

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(_FIELD.findall(self.input + self.output))

    @property
    def inverted(self) -> bool:
        """The template asks for the input given the answer (or for another field), not for the answer."""
        return self.output.strip() != "{answer}"

    @property
    def has_options(self) -> bool:
        return "{options_}" in self.input

    def render(self, example: dict) -> tuple[str, str]:
        """``(input, target)`` with the example's fields; ``options_`` is made from ``example['options']``."""
        values = dict(example)
        if "options_" in self.fields:
            if not example.get("options"):
                raise SlmError(f"FLAN template {self.dataset}[{self.index}] needs options; the example has none")
            values["options_"] = format_options(example["options"])
        missing = sorted(self.fields - set(values))
        if missing:
            raise SlmError(f"FLAN template {self.dataset}[{self.index}] uses field(s) {', '.join(missing)} "
                           f"the example does not have (it has: {', '.join(sorted(example))})")
        return _fill(self.input, values), _fill(self.output, values)


def format_options(options) -> str:
    """FLAN's options suffix (``preprocessors.format_options``): ``OPTIONS:\\n- a\\n- b``."""
    return "OPTIONS:\n- " + "\n- ".join(str(o) for o in options)


def _fill(pattern: str, values: dict) -> str:
    # FLAN's formatter replaces {name} parts only; other braces are text, so str.format is not used
    return _FIELD.sub(lambda m: str(values[m.group(1)]), pattern)


@lru_cache(maxsize=8)
def _read_patterns(path: str) -> dict[str, tuple[tuple[str, str], ...]]:
    file = Path(path)
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except FileNotFoundError:
        raise SlmError(f"{file}: FLAN template file not found (the FLAN repository's flan/templates.py; "
                       f"see ../shared/data/flan/)") from None
    except SyntaxError as e:
        raise SlmError(f"{file}: not a Python file (line {e.lineno}): {e.msg}") from None
    for node in tree.body:  # the first literal assignment PATTERNS = {...}
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "PATTERNS"):
            try:
                raw = ast.literal_eval(node.value)
            except ValueError:
                raise SlmError(f"{file}: PATTERNS (line {node.lineno}) is not a literal dictionary") from None
            return {name: tuple(_check_pair(file, name, pair) for pair in pairs) for name, pairs in raw.items()}
    raise SlmError(f"{file}: no PATTERNS = {{...}} dictionary in the file")


def _check_pair(file: Path, name: str, pair) -> tuple[str, str]:
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
        raise SlmError(f"{file}: PATTERNS[{name!r}] holds {pair!r}, not an (input, output) pair of strings")
    return pair


def load_patterns(path: str | Path) -> dict[str, list[Template]]:
    """Every dataset's templates in a FLAN templates file: ``{dataset: [Template, ...]}``."""
    raw = _read_patterns(str(Path(path).resolve()))
    return {name: [Template(name, i, inp, out) for i, (inp, out) in enumerate(pairs)] for name, pairs in raw.items()}
