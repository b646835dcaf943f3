"""Matrix-vector and small-batch matmul kernels for SmolLM2-135M's shapes, the candidates for compact weights.

    .venv/bin/python bench/kernels.py [--threads 2]

Prints microseconds per call (cache-hot loop, median-free mean of many calls) for fp32, int8
(``torch._weight_int8pack_mm``, bf16 activations) and int4 (``_weight_int4pack_mm_for_cpu``, group 32),
at batch rows M = 1, 8, 32, 256.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv, o, gate|up, down, head


def per_call_us(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; microseconds per call")
    print("| N x K | M | fp32 | int8 | int4 |\n|---|---|---|---|---|")
    for n, k in SHAPES:
        w = torch.randn(n, k)
        q8 = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        s8 = torch.rand(n).bfloat16()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        sz = torch.rand(k // 32, n, 2).bfloat16()
        for m in (1, 8, 32, 256):
            if n > 10000 and m > 1:
                continue
            x = torch.randn(m, k)
            xb = x.bfloat16()
            calls = max(3, int(2e7 / (n * k * m)))
            fp32 = per_call_us(lambda: torch.nn.functional.linear(x, w), calls)
            int8 = per_call_us(lambda: torch._weight_int8pack_mm(xb, q8, s8), calls)
            int4 = per_call_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz), calls)
            print(f"| {n} x {k} | {m} | {fp32:.0f} | {int8:.0f} | {int4:.0f} |")


if __name__ == "__main__":
    main()
