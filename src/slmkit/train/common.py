"""Helpers every training task shares, written once: data paths, main-rank-first preparation, corpus
shards and JSON / JSON Lines records (the per-epoch visiting order is ``train.epochs.EpochOrder``).

A task module (``slmkit.train.tasks.*``, ``slmkit.methods.*``) builds its ``RunParts`` from these.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator

from ..errors import SlmError
from .distributed import Dist


def data_path(path: str, data_dir: str | None = None) -> str:
    """A data path from a config: absolute as given, relative ones against ``data_dir`` when given (an
    experiment's ``--data-dir``), else ``$SLMKIT_DATA`` (else the current folder), as evaluation tasks
    resolve theirs. A path that does not exist is an error naming it."""
    p = Path(path).expanduser()
    base = data_dir if data_dir is not None else os.environ.get("SLMKIT_DATA")
    if not p.is_absolute() and base:
        p = Path(base).expanduser() / p
    if not p.exists():
        where = "--data-dir" if data_dir is not None else "$SLMKIT_DATA"
        hint = "" if p.is_absolute() and Path(path).is_absolute() else f" (relative data paths resolve against {where})"
        raise SlmError(f"data path {p} does not exist{hint}")
    return str(p)


def positive_int(value) -> bool:
    """An integer >= 1 (a YAML ``true`` is not one), for config checks."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def scratch_vocab_size(fields: dict, tokenizer_vocab: int) -> int:
    """A scratch model's vocabulary: ``model.config.vocab_size`` when set (popped from ``fields``), else the
    tokenizer's rounded up to a multiple of 64; never smaller than the tokenizer's."""
    size = fields.pop("vocab_size", None) or 64 * math.ceil(tokenizer_vocab / 64)
    if size < tokenizer_vocab:
        raise SlmError(f"model.config.vocab_size {size} is smaller than the tokenizer's {tokenizer_vocab}")
    return size


def on_main_then_all(d: Dist, make: Callable[[], object], ready: Callable[[], bool]) -> None:
    """Run ``make()`` on the main rank if ``ready()`` is false; the other ranks wait for it."""
    if d.main and not ready():
        make()
    d.barrier()


def prepare_shards(cfg, tokenizer, d: Dist) -> Path:
    """The run's packed token shards: ``data.shards`` when given, else made once from ``data.corpus`` under
    ``out_dir/data`` (and reused by a resumed run)."""
    from .corpus import prepare_corpus

    folder = Path(cfg.data.shards or Path(cfg.out_dir) / "data")
    if not cfg.data.shards and not cfg.data.corpus:
        raise SlmError("config: pretraining needs data.corpus (text files) or data.shards (prepared tokens)")
    on_main_then_all(d, lambda: prepare_corpus(cfg.data.corpus, tokenizer, folder, workers=cfg.data.workers,
                                               val_fraction=cfg.data.val_fraction, seed=cfg.run.seed,
                                               text_field=cfg.data.text_field, progress=cfg.run.progress),
                     lambda: (folder / "meta.json").is_file())
    meta = json.loads((folder / "meta.json").read_text())
    if meta["vocab_size"] > tokenizer.vocab_size:
        raise SlmError(f"{folder}: shards were made with a {meta['vocab_size']}-token vocabulary, the model's "
                       f"tokenizer has {tokenizer.vocab_size}")
    return folder


def json_records(path: str | Path, expected: str = "records") -> Iterator[tuple[int, int | None, object]]:
    """``(index, line, record)`` for each record of a JSON list (``.json``; ``line`` is None) or a JSON Lines
    file (blank lines skipped; ``line`` counts from 1). A file with another suffix is read as a JSON list
    when it is one, else as JSON Lines. Invalid JSON is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path}: no such file (expected a .json or .jsonl file of {expected})")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if suffix == ".json":
                raise SlmError(f"{path}: not valid JSON ({exc})") from None
            data = None
        if isinstance(data, list):
            yield from ((index, None, record) for index, record in enumerate(data))
            return
        if suffix == ".json":
            raise SlmError(f"{path}: expected a JSON list of {expected}, got {type(data).__name__}")
    index = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SlmError(f"{path}:{line_no}: not valid JSON ({exc})") from None
        yield index, line_no, record
        index += 1


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it into place: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
