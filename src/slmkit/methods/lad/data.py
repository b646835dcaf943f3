"""Labelled sentences for LAD's experiment, read from the files the benchmarks ship as (format detected):

* GLUE SST-2 TSV (``sentence<TAB>label`` header), e.g. ``sst2/glue_dev.tsv``;
* the Kim / Socher SST-2 split (``label sentence`` per line), e.g. ``sst2/stsa.binary.train``;
* AG News CSV (``Class Index,Title,Description`` header, classes 1..4), e.g. ``agnews/test.csv``;
* AG News TSV without a header (``text<TAB>class name``), e.g. ``agnews/alps_train_heldout_10k.tsv``;
* JSON Lines / a JSON list of ``{"text" or "sentence", "label"}``.

Unlabeled text for general distillation comes from JSONL corpora (one ``text`` per record), cut into lines.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from ...errors import SlmError
from ...train.common import write_atomically
from ...train.encoder_tasks import read_labelled

AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlmError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise SlmError(f"{path}: not UTF-8 text ({exc})") from None


def _int_label(raw: str, where: str, offset: int = 0) -> int:
    try:
        return int(raw) - offset
    except ValueError:
        raise SlmError(f"{where}: label {raw!r} is not an integer") from None


def read_examples(path: str | Path) -> list[tuple[str, int]]:
    """``(text, class index)`` for every example of a labelled file in one of the formats above."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return [(text, _int_label(raw, where)) for text, raw, where in read_labelled(path)]
    content = _read(path)
    lines = content.splitlines()
    if not lines:
        raise SlmError(f"{path}: no examples")
    first = lines[0].strip()
    if first.startswith("Class Index"):  # AG News CSV
        rows = list(csv.DictReader(io.StringIO(content)))
        out = []
        for n, row in enumerate(rows, start=2):
            if row.get("Class Index") is None or row.get("Description") is None:
                raise SlmError(f"{path}:{n}: expected the columns Class Index, Title, Description")
            text = f"{row.get('Title') or ''}. {row['Description']}".replace("\\", " ").strip()
            out.append((text, _int_label(row["Class Index"], f"{path}:{n}", offset=1)))
        return _checked(out, path, len(AGNEWS_CLASSES))
    if first.replace(" ", "") == "sentence\tlabel":  # GLUE TSV
        return _glue_tsv(lines, path)
    if "\t" in first and first.rsplit("\t", 1)[1].strip() in AGNEWS_CLASSES:  # AG News TSV, class names
        out = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text, _, name = line.rpartition("\t")
            if name.strip() not in AGNEWS_CLASSES:
                raise SlmError(f"{path}:{n}: class {name.strip()!r} is not one of {', '.join(AGNEWS_CLASSES)}")
            out.append((text.replace("\\", " ").strip(), AGNEWS_CLASSES.index(name.strip())))
        return out
    head = first.split(" ", 1)[0]
    if head.isdigit():  # label sentence
        out = []
        for n, line in enumerate(lines, start=1):
            if line.strip():
                raw, _, text = line.strip().partition(" ")
                out.append((text.strip(), _int_label(raw, f"{path}:{n}")))
        return out
    raise SlmError(f"{path}: not a labelled file this experiment reads (GLUE TSV with a sentence/label header, "
                   f"'label sentence' lines, AG News CSV or TSV, or JSON Lines with text and label)")


def _glue_tsv(lines: list[str], path: Path) -> list[tuple[str, int]]:
    out = []
    for n, line in enumerate(lines[1:], start=2):
        if line.strip():
            text, _, raw = line.rpartition("\t")
            out.append((text.strip(), _int_label(raw.strip(), f"{path}:{n}")))
    return out


def _checked(examples: list[tuple[str, int]], path: Path, n_classes: int) -> list[tuple[str, int]]:
    bad = next((label for _, label in examples if not 0 <= label < n_classes), None)
    if bad is not None:
        raise SlmError(f"{path}: class index {bad} outside 0..{n_classes - 1}")
    return examples


def corpus_lines(files: list[Path], n: int, seed: int, min_words: int = 6) -> list[str]:
    """``n`` lines of at least ``min_words`` words, drawn at random from JSONL corpora's ``text`` fields."""
    lines = []
    for path in files:
        for k, raw in enumerate(_read(path).split("\n"), start=1):  # not splitlines: texts hold U+2028
            if not raw.strip():
                continue
            try:
                text = json.loads(raw).get("text", "")
            except (ValueError, AttributeError):
                raise SlmError(f"{path}:{k}: not a JSON object with a text field") from None
            lines.extend(line.strip() for line in str(text).splitlines() if len(line.split()) >= min_words)
    if len(lines) < n:
        raise SlmError(f"the corpus gives {len(lines)} lines of {min_words}+ words; {n} were asked for")
    random.Random(seed).shuffle(lines)
    return lines[:n]


def write_jsonl(path: Path, examples: list[tuple[str, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in examples))
    return path


__all__ = ["AGNEWS_CLASSES", "read_examples", "corpus_lines", "write_jsonl"]
