"""Pretraining data: read text documents, tokenize them into packed token shards, read windows back.

``prepare_corpus`` turns .jsonl/.json/.txt files into a folder of raw token arrays::

    out_dir/train_000.bin, train_001.bin, ...   uint16 (uint32 when ids do not fit) tokens, back to back
    out_dir/val_000.bin, ...
    out_dir/meta.json                           dtype, vocab_size, eos_id, bos_id, splits, sources

Every document is encoded without special tokens and followed by one EOS id, the document boundary.
Text that spells a special token ("<|endoftext|>" inside a web page) is encoded as plain text, so
the only EOS ids in the stream are the boundaries. Documents go to the val split when a hash of
their index and the seed falls below ``val_fraction``; the result does not depend on ``workers``.

``PackedDataset`` memory-maps a split and serves windows of ``seq_len + 1`` tokens (inputs are
``w[:-1]``, targets ``w[1:]``), shuffled per epoch; ``document_mask`` gives the positions and
segment ids that keep attention inside one document.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import shutil
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tqdm.auto import tqdm

from ..errors import SlmError
from ..tokenizer import Tokenizer
from .epochs import EpochOrder

SUFFIXES = (".jsonl", ".json", ".txt")
_JSON_SPACE = " \t\r\n"  # a .jsonl line of only these is blank and skipped
_BATCH_DOCS, _BATCH_CHARS = 256, 1 << 20  # a worker's task: up to this many documents or characters

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]


# ---- reading documents ------------------------------------------------------------------------
def source_files(paths: Paths) -> list[Path]:
    """The files ``paths`` names, folders expanded to their .jsonl/.json/.txt files (recursively, by name)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise SlmError("no corpus paths given")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
                           key=lambda p: p.relative_to(path).as_posix())
            if not found:
                raise SlmError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise SlmError(f"{path}: unsupported corpus file type {path.suffix or '(none)'!r}; "
                               f"expected {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise SlmError(f"{path}: no such file or folder")
    return files


def read_documents(paths: Paths, text_field: str = "text") -> Iterator[str]:
    """Every document's text, in file order.

    ``.jsonl``: one JSON object per line (blank lines skipped), text in ``text_field``;
    ``.json``: a list of such objects; ``.txt``: the whole file is one document.
    """
    for file in source_files(paths):
        yield from _file_documents(file, text_field)


def _file_documents(file: Path, text_field: str) -> Iterator[str]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".txt":
            yield file.read_text(encoding="utf-8")
        elif suffix == ".json":
            try:
                records = json.loads(file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise SlmError(f"{file}: not valid JSON ({exc})") from None
            if not isinstance(records, list):
                raise SlmError(f"{file}: expected a JSON list of objects, got {type(records).__name__}")
            for index, record in enumerate(records):
                yield _text_of(record, text_field, f"{file}[{index}]")
        else:
            with file.open(encoding="utf-8", newline="\n") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip(_JSON_SPACE):
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as exc:
                        raise SlmError(f"{file}:{number}: not valid JSON ({exc})") from None
                    yield _text_of(record, text_field, f"{file}:{number}")
    except UnicodeDecodeError as exc:
        raise SlmError(f"{file}: not UTF-8 text ({exc})") from None


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise SlmError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise SlmError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise SlmError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _count_documents(file: Path) -> int:
    """How many documents ``_file_documents`` will yield, without parsing JSON lines."""
    suffix = file.suffix.lower()
    if suffix == ".txt":
        return 1
    if suffix == ".json":
        return _json_list_length(file)
    with file.open("rb") as handle:
        return sum(1 for line in handle if line.strip(_JSON_SPACE.encode()))


def _json_list_length(file: Path) -> int:
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlmError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise SlmError(f"{file}: expected a JSON list of objects, got {type(records).__name__}")
    return len(records)


# ---- the train/val split ----------------------------------------------------------------------
def val_mask(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """True for the documents that go to val: a hash of (seed, index) below ``val_fraction``.

    At least one document lands in each split (the lowest / highest hash is moved if needed).
    """
    if num_documents < 2:
        raise SlmError(f"the corpus has {num_documents} document(s); a train and a val split need at least 2")
    if not 0.0 < val_fraction < 1.0:
        raise SlmError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    index = np.arange(num_documents, dtype=np.uint64)
    salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    unit = (_splitmix64(index ^ salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    mask = unit < val_fraction
    if not mask.any():
        mask[np.argmin(unit)] = True
    if mask.all():
        mask[np.argmax(unit)] = False
    return mask


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a well-mixed 64-bit hash of each value (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# ---- tokenizing -------------------------------------------------------------------------------
class _Encoder:
    """Encodes a batch of documents into one train and one val token array (runs in the workers)."""

    def __init__(self, tokenizer_json: str, eos_id: int | None, dtype: str):
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.backend.encode_special_tokens = True  # "<|endoftext|>" typed in a document is just text
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets: about 1.5x faster
        self.encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.tail = [eos_id] if eos_id is not None else []
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str], to_val: list[bool]) -> tuple[np.ndarray, np.ndarray]:
        parts: dict[bool, list[int]] = {False: [], True: []}
        for encoding, val in zip(self.encode_batch(texts, add_special_tokens=False), to_val):
            parts[val].extend(encoding.ids)
            parts[val].extend(self.tail)
        return np.array(parts[False], dtype=self.dtype), np.array(parts[True], dtype=self.dtype)


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(tokenizer_json: str, eos_id: int | None, dtype: str) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the workers are the parallelism
    _WORKER_ENCODER = _Encoder(tokenizer_json, eos_id, dtype)


def _encode_in_worker(texts: list[str], to_val: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(texts, to_val)


def _batches(documents: Iterable[str], mask: np.ndarray) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    chars = read = 0
    for index, text in enumerate(documents):
        read = index + 1
        if read > len(mask):
            raise SlmError("the corpus files changed while being read (more documents than counted)")
        texts.append(text)
        chars += len(text)
        if len(texts) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            start = index + 1 - len(texts)
            yield texts, mask[start:index + 1].tolist()
            texts, chars = [], 0
    if texts:
        yield texts, mask[read - len(texts):read].tolist()
    if read != len(mask):
        raise SlmError("the corpus files changed while being read (fewer documents than counted)")


class _ShardWriter:
    """Appends tokens to ``{prefix}_000.bin``, ``{prefix}_001.bin``, ... of at most ``shard_tokens`` each."""

    def __init__(self, folder: Path, prefix: str, shard_tokens: int):
        self.folder, self.prefix, self.shard_tokens = folder, prefix, shard_tokens
        self.files: list[str] = []
        self.tokens = self.documents = 0
        self._handle = None
        self._room = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        while len(tokens):
            if self._room == 0:
                self._next_file()
            piece, tokens = tokens[:self._room], tokens[self._room:]
            piece.tofile(self._handle)
            self._room -= len(piece)
            self.tokens += len(piece)

    def _next_file(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.files):03d}.bin"
        self.files.append(name)
        self._handle = open(self.folder / name, "wb")
        self._room = self.shard_tokens

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def summary(self) -> dict:
        return {"files": self.files, "tokens": self.tokens, "documents": self.documents}


def prepare_corpus(paths: Paths, tokenizer: PathLike | Tokenizer, out_dir: PathLike, *, workers: int = 2,
                   val_fraction: float = 0.01, seed: int = 0, text_field: str = "text",
                   shard_tokens: int = 2 ** 24, append_eos: bool = True, progress: bool = True,
                   overwrite: bool = False) -> dict:
    """Tokenize ``paths`` into train/val token shards in ``out_dir``; returns what meta.json holds.

    ``tokenizer`` is a slmkit Tokenizer or a folder ``Tokenizer.from_hf_dir`` reads. The folder is
    built beside ``out_dir`` and renamed into place only when complete; an existing ``out_dir`` is
    an error unless ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SlmError(f"{out}: already exists; remove it or pass overwrite=True")
    if workers < 1:
        raise SlmError(f"workers must be at least 1, got {workers}")
    if shard_tokens < 1:
        raise SlmError(f"shard_tokens must be at least 1, got {shard_tokens}")
    tokenizer_path = None
    if not isinstance(tokenizer, Tokenizer):
        tokenizer_path = str(Path(tokenizer).resolve())
        tokenizer = Tokenizer.from_hf_dir(tokenizer)
    if append_eos and tokenizer.eos_id is None:
        raise SlmError("the tokenizer has no EOS token to mark document boundaries "
                       "(set eos_token in tokenizer_config.json, or pass append_eos=False)")
    files = source_files(paths)
    counts = [_count_documents(f) for f in files]
    mask = val_mask(sum(counts), val_fraction, seed)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"

    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    build.mkdir()  # a hidden sibling without meta.json: never mistaken for a finished corpus
    writers = {False: _ShardWriter(build, "train", shard_tokens), True: _ShardWriter(build, "val", shard_tokens)}
    try:
        encoder_args = (tokenizer.backend.to_str(), tokenizer.eos_id if append_eos else None, dtype)
        bar = tqdm(total=len(mask), desc="tokenizing", unit="doc", disable=not progress, dynamic_ncols=True)
        with bar:
            for (texts, to_val), (train, val) in _encode_all(files, text_field, mask, workers, encoder_args):
                n_val = sum(to_val)
                writers[False].write(train, len(texts) - n_val)
                writers[True].write(val, n_val)
                bar.update(len(texts))
                bar.set_postfix(tokens=f"{writers[False].tokens + writers[True].tokens:,}", refresh=False)
        for writer in writers.values():
            writer.close()
        meta = {
            "dtype": dtype, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
            "tokenizer": tokenizer_path, "append_eos": append_eos,
            "seed": seed, "val_fraction": val_fraction, "text_field": text_field,
            "splits": {"train": writers[False].summary(), "val": writers[True].summary()},
            "sources": [{"path": str(f.resolve()), "documents": n} for f, n in zip(files, counts)],
        }
        (build / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(build, out, overwrite)
    except BaseException:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(build, ignore_errors=True)
        raise
    return meta


def _encode_all(files: list[Path], text_field: str, mask: np.ndarray, workers: int, encoder_args: tuple):
    """(batch, encoded batch) pairs in corpus order; at most 2 batches per worker in flight."""
    documents = (text for file in files for text in _file_documents(file, text_field))
    batches = _batches(documents, mask)
    if workers == 1:  # in this process (where the tokenizers library may use its own threads)
        encoder = _Encoder(*encoder_args)
        for batch in batches:
            yield batch, encoder(*batch)
        return
    # fork (Linux): workers start at once, without re-importing slmkit (and torch) or the caller's
    # script, so scripts need no `if __name__ == "__main__":` guard. Elsewhere fork is unsafe: spawn.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=encoder_args)
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, *batch)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    except BrokenProcessPool as exc:
        raise SlmError("a tokenizing worker process died (out of memory?); try fewer workers, or on "
                       "macOS/Windows call prepare_corpus under `if __name__ == \"__main__\":`") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _move_into_place(build: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise SlmError(f"{out}: appeared while the corpus was being prepared; not replacing it")
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(build, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(build, out)


# ---- reading shards back ----------------------------------------------------------------------
class PackedDataset:
    """One split of a prepared corpus as windows of ``seq_len + 1`` tokens, memory-mapped."""

    def __init__(self, out_dir: PathLike, split: str = "train", seq_len: int = 256):
        folder = Path(out_dir)
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            raise SlmError(f"{folder}: not a prepared corpus (no meta.json); run prepare_corpus first")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SlmError(f"{meta_file}: not valid JSON ({exc})") from None
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise SlmError(f"{folder}: no split {split!r} (splits: {', '.join(splits) or 'none'})")
        if seq_len < 1:
            raise SlmError(f"seq_len must be at least 1, got {seq_len}")
        self.split, self.seq_len = split, seq_len
        self.eos_id: int | None = self.meta.get("eos_id")
        self.bos_id: int | None = self.meta.get("bos_id")
        self.vocab_size: int = self.meta["vocab_size"]
        self.dtype = np.dtype(self.meta["dtype"])
        self._shards = [self._map(folder / name) for name in splits[split]["files"]]
        self.total_tokens = sum(len(s) for s in self._shards)
        if self.total_tokens != splits[split]["tokens"]:
            raise SlmError(f"{folder}: split {split!r} holds {self.total_tokens} tokens, meta.json says "
                           f"{splits[split]['tokens']}; the shards are incomplete")
        if self.total_tokens < seq_len + 1:
            raise SlmError(f"{folder}: split {split!r} has {self.total_tokens} tokens, fewer than "
                           f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.num_windows = (self.total_tokens - 1) // seq_len
        self.order = EpochOrder(self.num_windows)

    def _map(self, file: Path) -> np.ndarray:
        if not file.is_file():
            raise SlmError(f"{file}: shard missing")
        size = file.stat().st_size
        if size % self.dtype.itemsize:
            raise SlmError(f"{file}: {size} bytes is not a whole number of {self.dtype} tokens")
        if size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(file, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return self.num_windows

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the split's stream (across shard boundaries) as int64."""
        pieces = []
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            offset = start - self._starts[shard]
            piece = self._shards[shard][offset:offset + stop - start]
            pieces.append(piece)
            start += len(piece)
            shard += 1
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)

    def window(self, i: int) -> np.ndarray:
        """Window ``i``: tokens ``i*seq_len`` to ``i*seq_len + seq_len`` inclusive (``seq_len + 1`` of them)."""
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range 0..{self.num_windows - 1}")
        start = int(i) * self.seq_len
        return self.tokens(start, start + self.seq_len + 1)

    def permutation(self, epoch: int, seed: int) -> np.ndarray:
        """The order windows are visited in during ``epoch`` (cached for the latest epoch)."""
        return self.order.permutation(epoch, seed)

    def sample(self, k: int, seed: int = 0) -> np.ndarray:
        """Global sample ``k`` over epochs: epoch ``k // num_windows``, windows shuffled per epoch."""
        if k < 0 or seed < 0:
            raise SlmError(f"sample index and seed must be non-negative, got k={k}, seed={seed}")
        epoch, position = divmod(int(k), self.num_windows)
        return self.window(int(self.permutation(epoch, seed)[position]))

    def batch(self, start: int, size: int, seed: int = 0) -> np.ndarray:
        """Samples ``start .. start+size-1`` stacked into a ``[size, seq_len + 1]`` int64 array."""
        return np.stack([self.sample(k, seed) for k in range(start, start + size)])


def document_mask(window_inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions restarting after each EOS, and segment ids that increase after each EOS.

    The EOS belongs to the document it ends. Two tokens may attend to each other only when their
    segment ids are equal (a block-diagonal causal mask).
    """
    tokens = np.asarray(window_inputs)
    if tokens.ndim != 1:
        raise SlmError(f"document_mask expects a 1-D array of tokens, got shape {tokens.shape}")
    ends = tokens == eos_id
    segments = np.zeros(len(tokens), dtype=np.int64)
    segments[1:] = np.cumsum(ends[:-1])
    index = np.arange(len(tokens), dtype=np.int64)
    starts = np.zeros(len(tokens), dtype=bool)
    starts[:1] = True
    starts[1:] = ends[:-1]
    positions = index - np.maximum.accumulate(np.where(starts, index, 0))
    return positions, segments
