"""Load on a real `slm serve` process: concurrency, memory, and a soak with disconnecting clients.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--quant int8] [--clients 32] [--soak 500]

1. One streaming client, 64 tokens (``ignore_eos``): its tokens/s.
2. ``--clients`` streaming clients at once, 64 tokens each: all must finish; aggregate tokens/s and the
   ratio to one client; the server's RSS before and after (after the burst and a short idle).
3. ``--soak`` requests with random parameters (completions and chat, streamed or not, temperature,
   top_p, n, stop, max_tokens) from 16 workers, 20 % of them disconnecting mid-stream:
   the server must stay up, every completed answer must be well-formed, and /metrics must show 0
   active sequences afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import urllib.request
from pathlib import Path

from _serving import start_server

try:
    import httpx
except ImportError:  # the openai client (a test extra) brings its fork under this name
    import httpx2 as httpx

MODEL = "bench"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def stream_tokens(client: httpx.AsyncClient, prompt: str, tokens: int, disconnect_after: int | None = None,
                        **extra) -> int:
    """Stream a completion; return how many text chunks arrived (stop early to disconnect)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, **extra}
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                obj = json.loads(line[6:])
                if obj["choices"]:
                    chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    return chunks  # leaving the block closes the connection mid-stream
    return chunks


PROMPTS = ["Once upon a time", "The history of the Roman empire", "def quicksort(xs):",
           "Here is a recipe for bread:", "The three laws of thermodynamics are", "Dear diary, today"]


async def concurrency(base: str, clients: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await stream_tokens(client, "Warm up", 8)
        t = time.perf_counter()
        await stream_tokens(client, PROMPTS[0], tokens)
        single = tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        results = await asyncio.gather(*(stream_tokens(client, PROMPTS[i % len(PROMPTS)], tokens)
                                         for i in range(clients)), return_exceptions=True)
        wall = time.perf_counter() - t
    errors = [r for r in results if isinstance(r, Exception)]
    return {"single_tok_s": single, "clients": clients, "errors": len(errors), "aggregate_tok_s": clients * tokens / wall,
            "ratio": clients * tokens / wall / single, "wall_s": wall}


def check_completion(obj: dict, n: int, chat: bool) -> None:
    assert obj["object"] == ("chat.completion" if chat else "text_completion"), obj
    assert len(obj["choices"]) == n, obj
    for c in obj["choices"]:
        assert c["finish_reason"] in ("stop", "length"), c
        assert isinstance(c["message"]["content"] if chat else c["text"], str)
    u = obj["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


async def soak(base: str, total: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    counts = {"completed": 0, "disconnected": 0, "malformed": 0, "errors": 0}
    todo = list(range(total))

    async def one(client: httpx.AsyncClient, i: int) -> None:
        chat = rng.random() < 0.5
        leave = rng.random() < 0.2  # a fifth of all requests hang up mid-stream
        stream = leave or rng.random() < 0.5
        n = rng.choice([1, 1, 1, 2])
        body = {"model": MODEL, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7, 1.0]),
                "top_p": rng.choice([1.0, 0.9]), "n": n, "seed": rng.randint(0, 99), "stream": stream}
        if rng.random() < 0.3:
            body["stop"] = rng.choice(["\n", ".", [",", "!"]])
        prompt = rng.choice(PROMPTS)
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            if stream:
                finished = 0
                async with client.stream("POST", path, json=body) as r:
                    r.raise_for_status()
                    seen = 0
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        obj = json.loads(line[6:])
                        seen += 1
                        if leave and seen >= 2:
                            counts["disconnected"] += 1
                            return
                        if "error" in obj:
                            counts["errors"] += 1
                            return
                        finished += sum(1 for c in obj["choices"] if c.get("finish_reason"))
                if finished != n:
                    counts["malformed"] += 1
                    return
            else:
                r = await client.post(path, json=body)
                r.raise_for_status()
                check_completion(r.json(), n, chat)
            counts["completed"] += 1
        except AssertionError:
            counts["malformed"] += 1
        except httpx.HTTPError:
            counts["errors"] += 1

    async def worker(client):
        while todo:
            await one(client, todo.pop())

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(16)))
    return counts


def metrics(base: str) -> dict:
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--soak", type=int, default=500)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    proc, base = start_server(args.model, "--model-id", MODEL, "--max-batch", str(args.max_batch),
                              "--threads", str(args.threads), "--quant", args.quant)
    report = {"model": args.model, "quant": args.quant, "threads": args.threads}
    try:
        asyncio.run(concurrency(base, 1, 8))  # warm: first allocations and kernels
        time.sleep(2)
        report["rss_before_mb"] = rss_mb(proc.pid)
        report["concurrency"] = asyncio.run(concurrency(base, args.clients, args.tokens))
        time.sleep(3)
        report["rss_after_mb"] = rss_mb(proc.pid)
        report["rss_change_pct"] = 100 * (report["rss_after_mb"] / report["rss_before_mb"] - 1)
        print(json.dumps(report, indent=1), flush=True)
        if args.soak:
            started = time.perf_counter()
            report["soak"] = asyncio.run(soak(base, args.soak))
            report["soak"]["seconds"] = round(time.perf_counter() - started, 1)
            time.sleep(2)
            report["soak"]["server_alive"] = proc.poll() is None
            m = metrics(base)
            report["soak"]["active_after"] = m.get("slmkit_active_sequences")
            report["soak"]["queue_after"] = m.get("slmkit_queue_depth")
            report["soak"]["cancelled_total"] = m.get("slmkit_cancelled_sequences_total")
            report["rss_after_soak_mb"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(report, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
