"""How glibc's allocator treats large buffers, set for each phase of a model's life (a no-op off glibc).

Loading: glibc raises its mmap threshold each time a large mmapped block is freed, so later large tensors
(dequantized weights while loading) come from the heap and stay resident after they are freed. Fixing the
threshold at 64 KiB returns them to the system at once: peak RSS of an int8 SmolLM2-135M load falls from
600-800 MB (varying run to run) to about 485 MB.

Running: with that threshold every activation, dequantized layer and output over 64 KiB is a fresh mmap,
page-faulted and zeroed on every call -- most of a 512-token prefill's copy and cast time. Once a model is
loaded the threshold goes up to 32 MiB (and the heap is trimmed only past 64 MiB free), so those buffers are
reused; the working set of inference is a few MB, so resident memory barely moves. Training keeps all freed
memory (PHASES).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# phase -> (mmap threshold, trim threshold, top pad) in bytes
PHASES = {
    "loading": (64 * 1024, 128 * 1024, 128 * 1024),
    "running": (32 * 2 ** 20, 64 * 2 ** 20, 128 * 1024),
    # training frees and re-allocates the same large activations every step: page faults on fresh mappings
    # cost a third of a LoRA step of SmolLM2 (53 -> 81 tokens/s), so nothing is given back
    "training": (32 * 2 ** 20, 2 ** 31 - 1, 256 * 2 ** 20),
}
_phase = "running"


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl has no mallopt)
        return None


def enter_phase(phase: str) -> bool:
    """Apply ``phase``'s allocator settings (see the module docstring); False where there is no mallopt."""
    global _phase
    libc = _libc()
    _phase = phase
    if libc is None:
        return False
    mmap, trim, pad = PHASES[phase]
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap) and libc.mallopt(M_TRIM_THRESHOLD, trim)
                and libc.mallopt(M_TOP_PAD, pad))


@contextlib.contextmanager
def loading():
    """The loading phase for a block of code, then back to the phase before it (``running`` after import)."""
    before = _phase if _phase != "loading" else "running"
    enter_phase("loading")
    try:
        yield
    finally:
        enter_phase(before)
