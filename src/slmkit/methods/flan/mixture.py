"""The FLAN training mixture: held-out clusters removed, per-dataset caps, examples-proportional mixing
with a maximum, a random template per example, zero/few-shot and with/without OPTIONS, CoT at a set rate.

Rates (``flan/mixtures.py``): dataset m with e_m = min(|m|, cap) examples gets r_m = min(e_m, K) / Σ_n
min(e_n, K) of the non-CoT share; the CoT sets share ``cot_rate`` of the total the same way. Counts are
the largest-remainder rounding of ``total * rate``, so the proportions hold exactly (to one example), and
a dataset smaller than its count is repeated in fresh shuffles. Formats follow the Flan Collection
(``zsopt``/``fsopt``/``zsnoopt``/``fsnoopt``; CoT sets have no options); a few-shot input is ``k`` exemplars of
the same dataset rendered with the same template, ``input\\n\\ntarget`` joined by ``\\n\\n\\n``
(``flan/v2/few_shot.py`` defaults). ``templates="fixed"`` is the no-variety ablation: every example of a
dataset in its first template that asks for the answer, zero-shot with options.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SlmError
from .sources import SOURCES, read_source
from .templates import V1_FILE, V2_FILE, Template, load_patterns

FORMATS = ("zsopt", "fsopt", "zsnoopt", "fsnoopt")
# flan/task_splits.py generate_inter_cluster_splits: clusters that also leave when one is held out
ALSO_HELD_OUT = {"entailment": {"paraphrase"}, "paraphrase": {"entailment"},
                 "reading_comprehension": {"read_comp_and_common_sense"},
                 "common_sense": {"read_comp_and_common_sense"},
                 "read_comp_and_common_sense": {"reading_comprehension", "common_sense"}}
# BoolQ and ARC-Easy here are evaluation splits: they stay out of training unless listed
TRAIN_SOURCES = ("rte", "cb", "snli", "sst2", "imdb", "ag_news", "trec", "copa", "piqa", "hellaswag")
EXEMPLAR_SEPARATOR, INPUT_TARGET_DELIMITER = "\n\n\n", "\n\n"


@dataclass
class MixtureConfig:
    sources: list[str] = field(default_factory=lambda: list(TRAIN_SOURCES))
    cot_sources: list[str] = field(default_factory=lambda: [n for n in SOURCES if SOURCES[n].cot])
    held_out: list[str] = field(default_factory=lambda: ["entailment"])  # clusters
    total: int = 20000            # examples in the mixture
    cap: int = 30000              # per-dataset cap (flan/tasks.py NUM_TRAIN_EXAMPLES)
    max_rate: int = 3000          # K of examples-proportional mixing (flan/mixtures.py mixing_rate_3k)
    cot_rate: float = 0.0         # share of the total from the CoT sets (Flan 2022: 5 %)
    templates: str = "random"     # random | fixed
    formats: dict[str, float] = field(default_factory=lambda: {f: 0.25 for f in FORMATS})
    fewshot: int = 2              # exemplars in a few-shot example
    seed: int = 0
    paths: dict[str, str] = field(default_factory=dict)  # source name -> file, instead of the default


def trained_sources(cfg: MixtureConfig) -> list[str]:
    """The non-CoT sources left after removing the held-out clusters and those FLAN removes with them."""
    unknown = sorted(set(cfg.sources + cfg.cot_sources) - set(SOURCES))
    if unknown:
        raise SlmError(f"unknown FLAN source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    gone = set(cfg.held_out)
    for cluster in cfg.held_out:
        gone |= ALSO_HELD_OUT.get(cluster, set())
    return [n for n in cfg.sources if SOURCES[n].cluster not in gone]


def mixing_rates(sizes: dict[str, int], cap: int, max_rate: int) -> dict[str, float]:
    """r_m = min(min(|m|, cap), K) / Σ_n min(min(|n|, cap), K)."""
    weights = {n: min(min(s, cap), max_rate) for n, s in sizes.items()}
    total = sum(weights.values())
    if total == 0:
        raise SlmError("the FLAN mixture has no examples")
    return {n: w / total for n, w in weights.items()}


def quotas(rates: dict[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding of ``total * rate``: the counts sum to ``total``."""
    raw = {n: total * r for n, r in rates.items()}
    counts = {n: int(v) for n, v in raw.items()}
    for n in sorted(raw, key=lambda n: raw[n] - counts[n], reverse=True)[: total - sum(counts.values())]:
        counts[n] += 1
    return counts


def usable_templates(templates: list[Template], example: dict) -> list[Template]:
    """The templates whose fields the dataset's examples have (BoolQ has no title here)."""
    have = set(example) | {"options_"}
    return [t for t in templates if t.fields <= have]


def render(template: Template, example: dict, *, options: bool = True,
           exemplars: list[dict] = ()) -> tuple[str, str]:
    """``(input, target)`` of ``example`` in ``template``, with or without OPTIONS, after ``exemplars``."""
    if not options and template.has_options:
        template = Template(template.dataset, template.index,
                            template.input.replace("{options_}", "").rstrip(), template.output)
    shots = [INPUT_TARGET_DELIMITER.join(template.render(e)) for e in exemplars]
    source, target = template.render(example)
    return EXEMPLAR_SEPARATOR.join([*shots, source]), target


def load_examples(cfg: MixtureConfig, names: list[str], data_dir: Path) -> dict[str, list[dict]]:
    return {n: read_source(n, cfg.paths.get(n) or data_dir / SOURCES[n].path)[: cfg.cap] for n in names}


def build_mixture(cfg: MixtureConfig, data_dir: str | Path, exclude: dict[str, set[str]] | None = None) -> list[dict]:
    """The mixture as records ``{input, target, messages, source, template, format}``, shuffled.

    ``exclude``: per source, question/premise texts to leave out (the evaluation items of that dataset)."""
    if cfg.templates not in ("random", "fixed"):
        raise SlmError(f"flan.templates must be 'random' or 'fixed', got {cfg.templates!r}")
    bad = sorted(set(cfg.formats) - set(FORMATS))
    if bad or not cfg.formats or any(w < 0 for w in cfg.formats.values()) or sum(cfg.formats.values()) <= 0:
        raise SlmError(f"flan.formats: weights over {', '.join(FORMATS)}, not all zero (got {cfg.formats})")
    for name in ("total", "cap", "max_rate"):
        if getattr(cfg, name) < 1:
            raise SlmError(f"flan.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.fewshot < 0:
        raise SlmError(f"flan.fewshot must be >= 0, got {cfg.fewshot}")
    if not 0 <= cfg.cot_rate <= 1:
        raise SlmError(f"flan.cot_rate must be within [0, 1], got {cfg.cot_rate}")
    data_dir = Path(data_dir)
    plain = trained_sources(cfg)
    cot = list(cfg.cot_sources) if cfg.cot_rate > 0 else []
    if not plain and not cot:
        raise SlmError("the FLAN mixture has no training source left after the held-out clusters")
    examples = load_examples(cfg, plain + cot, data_dir)
    for name, texts in (exclude or {}).items():
        if name in examples:
            examples[name] = [e for e in examples[name] if _key_text(e) not in texts]
    counts: dict[str, int] = {}
    n_cot = (round(cfg.total * cfg.cot_rate) if plain else cfg.total) if cot else 0
    if plain:
        counts |= quotas(mixing_rates({n: len(examples[n]) for n in plain}, cfg.cap, cfg.max_rate),
                         cfg.total - n_cot)
    if cot:
        counts |= quotas(mixing_rates({n: len(examples[n]) for n in cot}, cfg.cap, cfg.max_rate), n_cot)
    v1, v2 = load_patterns(data_dir / V1_FILE), load_patterns(data_dir / V2_FILE)
    rng = random.Random(cfg.seed)
    formats, weights = list(cfg.formats), list(cfg.formats.values())
    records = []
    for name, count in counts.items():
        source, pool = SOURCES[name], examples[name]
        templates = usable_templates((v2 if source.cot else v1)[source.templates], pool[0])
        if cfg.templates == "fixed":
            templates = [next(t for t in templates if not t.inverted)]
        for example in _draw(pool, count, rng):
            template = rng.choice(templates)
            fmt = "zsopt" if cfg.templates == "fixed" else rng.choices(formats, weights)[0]
            exemplars = []
            if fmt.startswith("fs") and len(pool) > 1:
                exemplars = [e for e in rng.sample(pool, min(cfg.fewshot + 1, len(pool))) if e is not example]
                exemplars = exemplars[: cfg.fewshot]
            source_text, target = render(template, example, options=not fmt.endswith("noopt"), exemplars=exemplars)
            records.append({"input": source_text, "target": target,
                            "messages": [{"role": "user", "content": source_text},
                                         {"role": "assistant", "content": target}],
                            "source": name, "template": template.index, "format": fmt})
    rng.shuffle(records)
    return records


def _draw(pool: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` examples: whole shuffled passes over ``pool``, then a part of one more."""
    out: list[dict] = []
    while len(out) < count:
        order = pool[:]
        rng.shuffle(order)
        out.extend(order[: count - len(out)])
    return out


def _key_text(example: dict) -> str:
    """The text an evaluation item is recognised by (its question, premise or sentence)."""
    for key in ("question", "premise", "sentence", "text", "goal", "context"):
        if key in example:
            return str(example[key]).strip()
    return ""
