"""Where the dense path overtakes the int4 block kernel, on this CPU: per-call time of an Int4Linear of each
SmolLM2-135M shape at batch rows M, on the block kernel (AVX-512 or AVX2, whichever the CPU has) and on the
dense path (weight expanded to bf16; natively multiplied where oneDNN has bf16 units, else emulated in fp32).

    .venv/bin/python bench/prefill_path.py [--threads 2] [--json bench/results/prefill_path.json]

The two paths run side by side, alternating, so machine noise hits both alike; the figure that matters is
the ratio. ``slmkit.nn.quant`` takes the dense path from ``dense_rows()`` rows: the first M where dense wins
on every shape (DENSE_ROWS where bf16 is native, DENSE_ROWS_EMULATED where it is not).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from slmkit.nn.quant import Int4Linear, compact_path, dense_rows, fast_bf16, quantize_int4

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate|up, down
ROWS = [8, 16, 32, 64, 128, 256, 512]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def ms_per_call(fn, seconds: float = 0.25) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell (the best is kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slmkit import kernels

    ops = kernels.load()
    block = "avx512" if ops is not None and ops.cpu_has_avx512() else "avx2" if ops is not None else "torch"
    print(f"{cpu_name()}; {args.threads} threads; block path {block}; bf16 native: {fast_bf16()}; "
          f"dense from {dense_rows()} rows now")
    print("| N x K | M | block ms | dense ms | dense / block |\n|---|---|---|---|---|")
    rows_out = []
    for n, k in SHAPES:
        torch.manual_seed(0)
        codes, scale, minimum = quantize_int4(torch.randn(n, k) * 0.05)
        layer = Int4Linear(codes, scale, minimum, None)
        for m in ROWS:
            x = torch.randn(m, k)
            best = {"block": float("inf"), "dense": float("inf")}
            for _ in range(args.rounds):
                for path in ("block", "dense"):
                    with compact_path(block if path == "block" else "dense"):
                        best[path] = min(best[path], ms_per_call(lambda: layer(x)))
            ratio = best["dense"] / best["block"]
            rows_out.append({"n": n, "k": k, "m": m, "block_ms": best["block"], "dense_ms": best["dense"]})
            print(f"| {n} x {k} | {m} | {best['block']:.3f} | {best['dense']:.3f} | {ratio:.2f} |", flush=True)
    wins = [m for m in ROWS if all(r["dense_ms"] < r["block_ms"] for r in rows_out if r["m"] >= m)]
    print(f"dense wins on every shape from M = {wins[0] if wins else 'never (up to ' + str(ROWS[-1]) + ')'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": args.threads, "block_path": block, "bf16_native": fast_bf16(),
                       "rows": rows_out, "dense_wins_from": wins[0] if wins else None}, f, indent=1)


if __name__ == "__main__":
    main()
