"""Opening llama.cpp (llama-cpp-python) as the reference engine of tests and benchmarks.

llama-cpp-python 0.3.36 built with GGML_NATIVE on an Intel CPU with AMX dies with SIGSEGV in
``ggml_backend_amx_mul_mat`` on the first Q4_1 matmul (seen 2026-12-02 on a 2-core Xeon with amx_int8: the
AMX "extra buffer type" takes the weights). On such a CPU the model is opened without extra buffer types,
so llama.cpp runs its AVX-512 VNNI dot products instead; elsewhere it opens as shipped. Imports neither torch
nor slmkit (the benchmark's llama.cpp worker measures its own memory).
"""

from __future__ import annotations

from pathlib import Path


def cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def open_llama(model_path: str, **kwargs):
    """``llama_cpp.Llama(model_path, **kwargs)``, without AMX weight buffers where the CPU has AMX."""
    import llama_cpp
    import llama_cpp.llama_cpp as raw

    if not cpu_has_amx():
        return llama_cpp.Llama(model_path=model_path, **kwargs)
    default_params = raw.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    raw.llama_model_default_params = without_extra_buffers  # read by Llama.__init__ at call time
    try:
        return llama_cpp.Llama(model_path=model_path, **kwargs)
    finally:
        raw.llama_model_default_params = default_params


AMX_NOTE = "llama.cpp opened without extra buffer types (its AMX matmul crashes here; see bench/llama_ref.py)"
