"""Reading evaluation records from data files: jsonl, json, csv/tsv with a header, and line files.

Every reader returns a list of dicts, one per example, so a task's templates see the same fields
whatever the file format. ``lines`` files are split by a regular expression with named groups
(``0 it 's a charming film`` -> ``{label: "0", sentence: "it 's ..."}``); ``documents`` files are
plain text cut into documents at a separator pattern (perplexity corpora).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import re
from pathlib import Path

from ..errors import SlmError

FORMATS = ("jsonl", "json", "csv", "tsv", "lines", "documents")


class DataError(SlmError):
    """An evaluation data file is missing or not in the declared format."""


def data_root(data_dir: str | Path | None = None) -> Path:
    """The folder relative task paths are resolved against: ``data_dir``, else ``$SLMKIT_DATA``, else ``.``."""
    return Path(data_dir or os.environ.get("SLMKIT_DATA") or ".").expanduser()


def resolve(path: str | Path, data_dir: str | Path | None = None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_root(data_dir) / p


def check_file(path: str | Path, data_dir: str | Path | None = None) -> Path:
    """The data file's full path; a clear error when it is not there."""
    full = resolve(path, data_dir)
    if not full.is_file():
        hint = "" if Path(path).is_absolute() else f" (relative paths are read under {data_root(data_dir)}; " \
                                                  f"set --data-dir or SLMKIT_DATA)"
        raise DataError(f"{full}: evaluation data file not found{hint}")
    return full


def _open_text(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        raw = bz2.decompress(raw)
    elif path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode(encoding)


def read_records(path: str | Path, fmt: str, *, data_dir: str | Path | None = None, encoding: str = "utf-8",
                 pattern: str | None = None, separator: str | None = None) -> list[dict]:
    """All records of one data file as dicts (see the module docstring for the formats)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (choose from {', '.join(FORMATS)})")
    full = check_file(path, data_dir)
    try:
        text = _open_text(full, encoding)
    except (OSError, UnicodeDecodeError, EOFError, ValueError) as e:
        raise DataError(f"{full}: cannot read as {encoding} text: {e}") from None
    if fmt == "jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{full}:{n}: not a JSON line: {e.msg}") from None
    elif fmt == "json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{full}: not JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(records, list):
            raise DataError(f"{full}: a json data file must hold a list of records")
    elif fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
        records = list(csv.DictReader(io.StringIO(text), delimiter=delimiter, quoting=quoting))
    elif fmt == "lines":
        if not pattern:
            raise DataError("the 'lines' format needs a 'pattern' with named groups")
        rx = re.compile(pattern)
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            m = rx.match(line)
            if m is None:
                raise DataError(f"{full}:{n}: line does not match the pattern {pattern!r}")
            records.append(m.groupdict())
    else:  # documents
        records = [{"text": doc} for doc in split_documents(text, separator)]
    if not records or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{full}: no records of the form field -> value")
    return records


def split_documents(text: str, separator: str | None) -> list[str]:
    """Cut ``text`` before every line matching ``separator`` (the whole text is one document without one)."""
    if not separator:
        return [text] if text.strip() else []
    rx = re.compile(separator)
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if rx.match(line) and any(part.strip() for part in current):
            docs.append("".join(current))
            current = []
        current.append(line)
    if any(part.strip() for part in current):
        docs.append("".join(current))
    return docs
