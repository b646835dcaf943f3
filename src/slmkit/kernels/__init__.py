"""slmkit's own CPU kernels, compiled once with the machine's C++ compiler as a torch extension.

``load()`` returns the module (``int8_linear``: the AVX2 int8 weight-only matmul of ``int8_linear.cpp``;
``rms_norm`` and ``silu_mul`` of ``fused_ops.cpp``), or ``None`` where it cannot run: not an x86 CPU with
AVX2, no compiler, or ``SLMKIT_KERNELS=0``; callers then use torch's own ops. The build is cached by torch
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) and redone only when a source changes;
``python -m slmkit.kernels`` builds it ahead of time (``make install`` does).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(name) for name in ("bindings.cpp", "int8_linear.cpp", "fused_ops.cpp")]


def _cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX")


@functools.cache
def load():
    """The compiled kernels module, or ``None`` (see the module docstring)."""
    if os.environ.get("SLMKIT_KERNELS", "1") == "0" or not _cpu_has_avx2():
        return None
    from torch.utils.cpp_extension import load as build

    try:
        return build(name="slmkit_cpu_kernels", sources=[str(p) for p in _SOURCES],
                     extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no headers: torch's own ops still work
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        print(f"slmkit: the CPU kernels could not be built ({type(exc).__name__}: {first_line}); "
              "using torch's ops", file=sys.stderr)
        return None


def inference_only(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph is wanted for ``tensors``: the kernels have no backward."""
    return torch.is_inference_mode_enabled() or not (torch.is_grad_enabled()
                                                     and any(t.requires_grad for t in tensors))
