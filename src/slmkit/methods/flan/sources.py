"""The datasets of the FLAN mixture that exist in ``../shared/data``, read into FLAN's example fields.

Each ``Source`` names the FLAN template list it uses, FLAN's task cluster (``flan/task_splits.py``) and a
reader that turns one file into examples ``{<template fields>, "options": [...], "answer": str}``; the
options and their order are FLAN's (``flan/tasks.py``: the answer is ``options[label]``). Chain-of-thought
sources (Flan Collection, ``cot_data/*_train.tsv``: question, answer, rationale) have no options.
A file in the same format elsewhere works: ``read_source(name, path)``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import SlmError
from ...train.common import json_records

NLI_OPTIONS = {"rte": ["yes", "no"], "cb": ["Yes", "No", "It's impossible to say"],
               "snli": ["yes", "it is not possible to tell", "no"]}
NLI_LABELS = {"rte": {"entailment": 0, "not_entailment": 1},
              "cb": {"entailment": 0, "contradiction": 1, "neutral": 2},
              "snli": {"entailment": 0, "neutral": 1, "contradiction": 2}}
SENTIMENT = ["negative", "positive"]
AG_NEWS = ["World", "Sports", "Business", "Science/Tech"]
TREC = {"DESC": "description", "ENTY": "entity", "ABBR": "abbreviation", "HUM": "human", "NUM": "numeric",
        "LOC": "location"}
TREC_INDEX = {coarse: i for i, coarse in enumerate(TREC)}


@dataclass(frozen=True)
class Source:
    name: str          # our name for the dataset
    templates: str     # the FLAN PATTERNS key
    cluster: str       # FLAN's task cluster
    path: str          # default file, relative to the data folder
    reader: Callable[[Path, str], list[dict]]
    cot: bool = False  # a chain-of-thought set (Flan Collection), rendered with the v2 templates


# ---------------------------------------------------------------- readers
def _jsonl(path: Path) -> list[dict]:
    return [record for _, _, record in json_records(path, "FLAN examples")]


def _lines(path: Path, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """Numbered non-empty lines split at \\n only (str.splitlines also splits at U+2028, found in GSM8K)."""
    text = path.read_text(encoding=encoding)
    return [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _field(path: Path, n: int, record: dict, key: str):
    if key not in record:
        raise SlmError(f"{path}, record {n}: no field {key!r} (fields: {', '.join(record)})")
    return record[key]


def _labelled(path: Path, n: int, labels: dict, label) -> int:
    if label not in labels:
        raise SlmError(f"{path}, record {n}: label {label!r} is not one of {', '.join(map(str, labels))}")
    return labels[label]


def read_nli(path: Path, name: str) -> list[dict]:
    """SuperGLUE RTE / CB jsonl ``{premise, hypothesis, label}``, or SNLI's TSV ``label\\tpremise\\thypothesis``."""
    options, labels = NLI_OPTIONS[name], NLI_LABELS[name]
    if path.suffix == ".jsonl":
        rows = [(_field(path, n, r, "premise"), _field(path, n, r, "hypothesis"), _field(path, n, r, "label"))
                for n, r in enumerate(_jsonl(path), 1)]
    else:
        rows = []
        for n, line in _lines(path):
            parts = line.split("\t")
            if len(parts) != 3:
                raise SlmError(f"{path}, line {n}: expected label<TAB>premise<TAB>hypothesis")
            rows.append((parts[1], parts[2], parts[0]))
    return [{"premise": p, "hypothesis": h, "options": options, "answer": options[_labelled(path, n, labels, y)]}
            for n, (p, h, y) in enumerate(rows, 1)]


def read_sst2(path: Path, name: str) -> list[dict]:
    """GLUE SST-2 TSV with a header ``sentence\\tlabel``."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"sentence": _field(path, n, r, "sentence").strip(), "options": SENTIMENT,
             "answer": SENTIMENT[_labelled(path, n, {"0": 0, "1": 1}, _field(path, n, r, "label"))]}
            for n, r in enumerate(rows, 2)]


def read_label_text(path: Path, name: str) -> list[dict]:
    """``label text`` lines, 0 = negative, 1 = positive (TextFooler's IMDB / MR files)."""
    out = []
    for n, line in _lines(path):
        label, _, text = line.partition(" ")
        out.append({"text": text.strip(), "options": SENTIMENT,
                    "answer": SENTIMENT[_labelled(path, n, {"0": 0, "1": 1}, label)]})
    return out


def read_ag_news(path: Path, name: str) -> list[dict]:
    """AG News CSV with a header ``Class Index,Title,Description`` (1-4)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = {str(i + 1): i for i in range(4)}
    return [{"title": _field(path, n, r, "Title"), "text": _field(path, n, r, "Description").replace("\\", " "),
             "options": AG_NEWS, "answer": AG_NEWS[_labelled(path, n, labels, _field(path, n, r, "Class Index"))]}
            for n, r in enumerate(rows, 2)]


def read_trec(path: Path, name: str) -> list[dict]:
    """TREC ``COARSE:fine question`` lines (latin-1); the coarse class is the label."""
    out, options = [], list(TREC.values())
    for n, line in _lines(path, "latin-1"):
        label, _, text = line.partition(" ")
        coarse = label.split(":")[0]
        out.append({"text": text.strip(), "options": options, "answer": options[_labelled(path, n, TREC_INDEX, coarse)]})
    return out


def _choice_records(path: Path) -> list[tuple[int, dict, list[str], int]]:
    out = []
    for n, r in enumerate(_jsonl(path), 1):
        choices, gold = _field(path, n, r, "choices"), _field(path, n, r, "gold")
        if not isinstance(choices, list) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise SlmError(f"{path}, record {n}: 'choices' must be a list and 'gold' an index into it")
        out.append((n, r, [str(c) for c in choices], gold))
    return out


def read_copa(path: Path, name: str) -> list[dict]:
    """llm-foundry COPA ``{query: "<premise>, therefore|because", choices, gold}`` -> premise, question."""
    out = []
    for n, r, choices, gold in _choice_records(path):
        query = str(_field(path, n, r, "query")).strip()
        m = re.fullmatch(r"(.*?)[,.]?\s+(therefore|because)", query)
        if m is None:
            raise SlmError(f"{path}, record {n}: a COPA query ends with 'therefore' or 'because'")
        out.append({"premise": m.group(1) + ".", "question": "effect" if m.group(2) == "therefore" else "cause",
                    "options": choices, "answer": choices[gold]})
    return out


def read_question_choices(path: Path, name: str) -> list[dict]:
    """llm-foundry ``{query: "Question: …", choices, gold}`` (ARC, PIQA) -> question / goal."""
    key = "goal" if name == "piqa" else "question"
    out = []
    for n, r, choices, gold in _choice_records(path):
        text = re.sub(r"^Question:\s*", "", str(_field(path, n, r, "query"))).strip()
        text = re.sub(r"\s*Answer:$", "", text)
        out.append({key: text, "options": choices, "answer": choices[gold]})
    return out


def read_hellaswag(path: Path, name: str) -> list[dict]:
    """``{ctx, endings[4], label}`` (the converted HellaSwag validation file)."""
    out = []
    for n, r in enumerate(_jsonl(path), 1):
        endings, label = _field(path, n, r, "endings"), _field(path, n, r, "label")
        if not isinstance(endings, list) or str(label) not in {str(i) for i in range(len(endings))}:
            raise SlmError(f"{path}, record {n}: 'endings' must be a list and 'label' an index into it")
        endings, label = [str(e) for e in endings], int(label)
        out.append({"context": str(_field(path, n, r, "ctx")), "options": endings, "answer": endings[label]})
    return out


def read_boolq(path: Path, name: str) -> list[dict]:
    """llm-foundry BoolQ ``{query: "Passage: …\\nQuestion: …?", choices: [no, yes], gold}``."""
    out = []
    for n, r, choices, gold in _choice_records(path):
        m = re.fullmatch(r"Passage:\s*(.*)\nQuestion:\s*(.*?)\??\s*", str(_field(path, n, r, "query")), re.S)
        if m is None:
            raise SlmError(f"{path}, record {n}: a BoolQ query reads 'Passage: …\\nQuestion: …?'")
        out.append({"text": m.group(1).strip(), "question": m.group(2).strip(), "options": ["no", "yes"],
                    "answer": ["no", "yes"][gold]})
    return out


def read_cot(path: Path, name: str) -> list[dict]:
    """Flan Collection CoT TSV: ``question\\tanswer\\trationale`` (literal \\n in the text is a newline)."""
    out = []
    for n, line in _lines(path):
        parts = line.split("\t")
        if len(parts) != 3:
            raise SlmError(f"{path}, line {n}: expected question<TAB>answer<TAB>rationale")
        out.append({"question": parts[0].replace("\\n", "\n"), "answer": parts[1],
                    "chain_of_thought": parts[2].replace("\\n", "\n")})
    return out


_COT = {"gsm8k": "cot_gsm8k", "strategyqa": "cot_strategyqa", "creak": "cot_creak", "qasc": "cot_qasc",
        "ecqa": "cot_ecqa", "sensemaking": "cot_sensemaking", "aqua": "stream_aqua"}

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("rte", "rte", "entailment", "rte/train.jsonl", read_nli),
    Source("cb", "cb", "entailment", "cb/train.jsonl", read_nli),
    Source("snli", "snli", "entailment", "textfooler_1k/snli.txt", read_nli),
    Source("sst2", "sst2", "sentiment", "sst2/glue_train_part1.tsv", read_sst2),
    Source("imdb", "imdb_reviews", "sentiment", "textfooler_1k/imdb.txt", read_label_text),
    Source("ag_news", "ag_news_subset", "summarization", "agnews/test.csv", read_ag_news),
    Source("trec", "trec", "question_classification", "trec/train.txt", read_trec),
    Source("copa", "copa", "common_sense", "commonsense_mc/copa.jsonl", read_copa),
    Source("piqa", "piqa", "common_sense", "commonsense_mc/piqa.jsonl", read_question_choices),
    Source("hellaswag", "hellaswag", "common_sense", "commonsense_mc/hellaswag_val.jsonl", read_hellaswag),
    Source("boolq", "bool_q", "reading_comprehension", "boolq/boolq_val.jsonl", read_boolq),
    Source("arc_easy", "arc", "open_domain_qa", "commonsense_mc/arc_easy.jsonl", read_question_choices),
    *[Source(f"cot_{name}", key, "cot", f"flan/cot_data/{name}_train.tsv", read_cot, cot=True)
      for name, key in _COT.items()],
]}


def read_source(name: str, path: str | Path) -> list[dict]:
    """The examples of source ``name`` read from ``path`` (any file in that source's format)."""
    if name not in SOURCES:
        raise SlmError(f"unknown FLAN source {name!r}; known: {', '.join(SOURCES)}")
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path}: data file of FLAN source {name!r} not found")
    examples = SOURCES[name].reader(path, name)
    if not examples:
        raise SlmError(f"{path}: no examples for FLAN source {name!r}")
    return examples
