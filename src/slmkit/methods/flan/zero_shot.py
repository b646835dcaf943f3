"""Zero-shot rank classification over FLAN's options, as the FLAN papers evaluate a held-out cluster.

For each evaluation dataset and each of its templates that asks for the answer with an OPTIONS suffix,
every item is rendered with that template (through the model's chat template when ``chat``), and the
option with the highest summed log-likelihood as the continuation wins (``rank_classification_from_options``,
not length-normalised). The harness's ``multiple_choice`` scoring does the work; a dataset's score is the
mean over its templates, with the best and worst template beside it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from ...errors import SlmError
from ...eval.runner import Evaluator
from ...eval.task import Task
from .sources import SOURCES, read_source
from .templates import V1_FILE, Template, load_patterns
from .mixture import render, usable_templates


def scoring_templates(source: str, example: dict, data_dir: Path, limit: int | None = None) -> list[Template]:
    """The templates of ``source`` that rank its options: input with ``{options_}``, output ``{answer}``."""
    templates = [t for t in usable_templates(load_patterns(data_dir / V1_FILE)[SOURCES[source].templates], example)
                 if t.has_options and not t.inverted]
    return templates[:limit] if limit else templates


def rank_records(examples: list[dict], template: Template, chat=None) -> list[dict]:
    """Harness records ``{prompt, choices, gold}``: the rendered input (wrapped by ``chat(text)`` if given)."""
    records = []
    for example in examples:
        prompt, answer = render(template, example)
        options = [str(o) for o in example["options"]]
        if answer not in options:
            raise SlmError(f"{template.dataset}: answer {answer!r} is not one of its options {options}")
        records.append({"prompt": chat(prompt) if chat else prompt, "choices": options,
                        "gold": options.index(answer)})
    return records


def evaluate_zero_shot(lm, sources: dict[str, str | Path], data_dir: str | Path, *, chat: bool = False,
                       limit: int | None = None, max_templates: int | None = None, batch_size: int = 8,
                       progress: bool = True) -> dict[str, dict]:
    """``{source: {"mean", "best", "worst", "n", "templates": {index: acc}}}`` for ``sources``
    (name -> evaluation file)."""
    data_dir = Path(data_dir)
    evaluator = Evaluator(lm, batch_size=batch_size, progress=progress, data_dir=data_dir)
    wrap = None
    if chat:
        wrap = lambda text: lm.chat_prompt([{"role": "user", "content": text}])  # noqa: E731
    results = {}
    with tempfile.TemporaryDirectory(prefix="flan-eval-") as tmp:
        for name, path in sources.items():
            examples = read_source(name, path)[:limit] if limit else read_source(name, path)
            per_template = {}
            for template in scoring_templates(name, examples[0], data_dir, max_templates):
                file = Path(tmp) / f"{name}_{template.index}.jsonl"
                with open(file, "w", encoding="utf-8") as f:
                    for record in rank_records(examples, template, wrap):
                        f.write(json.dumps(record) + "\n")
                task = Task.from_dict({"name": f"flan_{name}_t{template.index}", "kind": "multiple_choice",
                                       "data": str(file), "prompt": "{{ prompt }}", "choices": "choices",
                                       "target": "gold", "metrics": ["acc"],
                                       "target_delimiter": "" if chat else " "}, origin=f"FLAN {name}")
                per_template[template.index] = evaluator.run(task)["result"]["acc"]
            if not per_template:
                raise SlmError(f"FLAN source {name!r} has no template that ranks options")
            accs = list(per_template.values())
            results[name] = {"mean": statistics.fmean(accs), "best": max(accs), "worst": min(accs),
                             "n": len(examples), "templates": per_template}
    return results
