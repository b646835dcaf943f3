"""slmkit's own CPU kernels, compiled once with the machine's C++ compiler as a torch extension.

``load()`` returns the module -- ``int8_linear`` and ``int4_linear`` (weight-only matmuls with int8-block
activations, ``int8_linear.cpp`` / ``int4_linear.cpp``), ``rms_norm``, ``silu_mul`` and ``attend_one``
(``fused_ops.cpp``), ``DecodeLayer`` (a compact model's whole decoder layer for one new token per row,
``decode_layer.cpp``) -- or ``None`` where it cannot run: not an x86 CPU with AVX2, no compiler, or
``SLMKIT_KERNELS=0``; callers then use torch's own ops. The matmuls carry AVX-512 VNNI variants compiled per
function and picked at run time (``avx512.h``; ``SLMKIT_AVX512=0`` or ``set_avx512(False)`` keeps the 256-bit
code). The build lives in a folder named by a hash of the
sources, flags, torch and Python versions (under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/slmkit/kernels``), so a
later process imports it directly and a changed source builds afresh; ``python -m slmkit.kernels`` builds it
ahead of time (``make install`` does).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(name) for name in ("bindings.cpp", "avx512.cpp", "int8_linear.cpp",
                                                          "int4_linear.cpp", "fused_ops.cpp", "decode_layer.cpp",
                                                          "dequantize.cpp")]
_HEADERS = [Path(__file__).with_name(name) for name in ("avx512.h", "common.h", "linear.h", "fused.h")]


def _vnni_flags() -> list[str]:
    """The compiler flags for the CPU's VNNI dot-product instruction, if it has one (common.h: dot_u8s8)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    if "avx_vnni" in flags:  # the VEX form first: -mavx512* would let the compiler use 512-bit code elsewhere
        return ["-mavxvnni"]
    if {"avx512_vnni", "avx512vl"} <= flags:
        return ["-mavx512f", "-mavx512vl", "-mavx512vnni"]
    return []


_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"] + _vnni_flags()  # part of the build folder's hash
_NAME = "slmkit_cpu_kernels"


def _cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX")


def _build_dir() -> Path:
    """A folder per (sources, flags, torch, Python): a built module there is current by construction."""
    digest = hashlib.sha256()
    for path in _SOURCES + _HEADERS:
        digest.update(path.read_bytes())
    for text in (" ".join(_FLAGS), torch.__version__, sys.version):
        digest.update(text.encode())
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slmkit" / "kernels"
    return Path(cache) / f"{_NAME}_{digest.hexdigest()[:12]}"


def _import_built(folder: Path):
    """The module built earlier in ``folder`` (no compiler, no ninja run), or None."""
    path = folder / f"{_NAME}.so"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def load():
    """The compiled kernels module, or ``None`` (see the module docstring)."""
    if os.environ.get("SLMKIT_KERNELS", "1") == "0" or not _cpu_has_avx2():
        return None
    try:
        folder = _build_dir()
        module = _import_built(folder)
        if module is None:
            from torch.utils.cpp_extension import load as build

            folder.mkdir(parents=True, exist_ok=True)
            module = build(name=_NAME, sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(folder))
        return module
    except Exception as exc:  # no compiler, no headers: torch's own ops still work
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        print(f"slmkit: the CPU kernels could not be built ({type(exc).__name__}: {first_line}); "
              "using torch's ops", file=sys.stderr)
        return None


def inference_only(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph is wanted for ``tensors``: the kernels have no backward."""
    return torch.is_inference_mode_enabled() or not (torch.is_grad_enabled()
                                                     and any(t.requires_grad for t in tensors))
