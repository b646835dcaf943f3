"""GGUF export against llama.cpp, side by side on one machine: for each export type, slmkit's export time and
file size, llama-quantize's time on the same f16 weights, the share of blocks byte-identical to its output,
and top-1 agreement of llama.cpp on slmkit's file with slmkit on the same file (weights dequantized).

    .venv/bin/python bench/gguf_export.py [MODEL]      (default: the packaged SmolLM2-135M-Instruct)
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402
from llama_ref import open_llama  # noqa: E402

import slmkit  # noqa: E402
from slmkit.formats.gguf import GGUFFile  # noqa: E402
from slmkit.formats.gguf_quants import GGML_TYPES  # noqa: E402

TEXT = ("The history of the Roman Empire is long and complicated. It began when a small city on the Tiber "
        "grew, by war and by alliance, into the master of the Mediterranean world. ") * 3
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}


def agreement(path: Path, ids: list[int]) -> float:
    lm = slmkit.load(path, quant="none")
    llm = open_llama(str(path), n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    ref = np.array(llm.scores[:len(ids)])
    return float((ref.argmax(-1) == lm.logits(ids)[0].numpy().argmax(-1)).mean())


def main(model: str = "smollm2-135m-instruct") -> None:
    tmp = Path(tempfile.mkdtemp())
    lm = slmkit.load(model)
    started = time.perf_counter()
    f16 = lm.export_gguf(tmp / "f16.gguf", quant="f16", progress=False)
    rows = [("f16", time.perf_counter() - started, f16, None, None)]
    base = slmkit.load(f16)
    for quant, ftype in FTYPES.items():
        started = time.perf_counter()
        ours = base.export_gguf(tmp / f"{quant}.gguf", quant=quant, progress=False)
        ours_s = time.perf_counter() - started
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        ref = tmp / f"llama-{quant}.gguf"
        started = time.perf_counter()
        llama_cpp.llama_model_quantize(str(f16).encode(), str(ref).encode(), ctypes.byref(params))
        ref_s = time.perf_counter() - started
        a, b = GGUFFile(ours), GGUFFile(ref)
        same = total = 0
        for name, info in b.tensors.items():
            size = GGML_TYPES[info.ggml_type].type_size
            eq = (a.raw(name).reshape(-1, size) == b.raw(name).reshape(-1, size)).all(1)
            same, total = same + int(eq.sum()), total + eq.size
        rows.append((quant, ours_s, ours, ref_s, same / total))
    ids = base.tokenizer.encode(TEXT)
    print(f"model {model}, {len(ids)} tokens of text for top-1 agreement\n")
    print("| type | slmkit export s | size MiB | llama-quantize s | blocks identical | top-1 vs llama.cpp |")
    print("|---|---|---|---|---|---|")
    for quant, seconds, path, ref_s, same in rows:
        ref_col = "-" if ref_s is None else f"{ref_s:.1f}"
        same_col = "-" if same is None else f"{100 * same:.3f} %"
        print(f"| {quant} | {seconds:.1f} | {path.stat().st_size / 2 ** 20:.1f} | {ref_col} | {same_col} | "
              f"{100 * agreement(path, ids):.1f} % |")


if __name__ == "__main__":
    main(*sys.argv[1:])
