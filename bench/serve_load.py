"""Load on a real `slm serve` process: concurrency, memory, and a soak with disconnecting clients.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--quant auto] [--clients 32] [--soak 500]

0. The engine without the server, in a fresh process: the same Batcher the server runs, on the thread that
   loaded the model, one sequence and then ``--clients`` at once (the baseline the server must keep up with).
1. One streaming client, 64 tokens (``ignore_eos``): its tokens/s.
2. ``--clients`` streaming clients at once, 64 tokens each: all must finish; aggregate tokens/s and the
   ratio to one client; the server's RSS before and after (after the burst and a short idle).
   Steps 0-2 repeat ``--rounds`` times, alternating (the server idles while the baseline runs), and the
   report keeps each round and the medians: on a shared machine one pair of runs can differ by 25 %.
   Rates are measured alike on both sides: one stream's rate over its decode phase (first to last token),
   the aggregate as all tokens over the wall time from sending the requests to the last token.
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
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _serving import start_server

try:
    import httpx
except ImportError:  # the openai client (a test extra) brings its fork under this name
    import httpx2 as httpx

MODEL = "bench"


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def stream_tokens(client: httpx.AsyncClient, prompt: str, tokens: int, **extra) -> list[float]:
    """Stream a completion; return the arrival time of each text chunk (one per token)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, **extra}
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"]:
                    stamps.append(time.perf_counter())
    return stamps


def stream_rate(stamps: list[float]) -> float:
    """Tokens 2..N over the time from the first token to the last: the decode phase of one stream."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


PROMPTS = ["Once upon a time", "The history of the Roman empire", "def quicksort(xs):",
           "Here is a recipe for bread:", "The three laws of thermodynamics are", "Dear diary, today"]


async def concurrency(base: str, clients: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await stream_tokens(client, "Warm up", 8)
        single = stream_rate(await stream_tokens(client, PROMPTS[0], tokens))
        t = time.perf_counter()
        results = await asyncio.gather(*(stream_tokens(client, PROMPTS[i % len(PROMPTS)], tokens)
                                         for i in range(clients)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    streams = [r for r in results if not isinstance(r, Exception)]
    wall = max(s[-1] for s in streams) - t
    aggregate = sum(len(s) for s in streams) / wall
    return {"single_tok_s": single, "clients": clients, "errors": len(errors), "aggregate_tok_s": aggregate,
            "ratio": aggregate / single, "wall_s": wall}


def in_process(model: str, quant: str, threads: int, max_batch: int, clients: int, tokens: int) -> dict:
    """Step 0 in a fresh process (the server's own situation): the figures ``concurrency`` measures, without
    HTTP."""
    out = subprocess.run([sys.executable, __file__, "--engine-only", json.dumps([model, quant, threads, max_batch,
                                                                                 clients, tokens])],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def engine_only(model: str, quant: str, threads: int, max_batch: int, clients: int, tokens: int) -> dict:
    import slmkit
    from slmkit.engine.batcher import Batcher, Sequence
    from slmkit.engine.sampling import SamplingParams

    lm = slmkit.load(model, threads=threads, quant=quant)

    def run(prompts: list[str], n: int) -> tuple[float, list[list[float]]]:
        batcher = Batcher(lm.model, lm.tokenizer, lm.eos_ids, max_batch)
        stamps, left = [[] for _ in prompts], [len(prompts)]

        def sink(i):
            def take(event):
                if event.token is not None:
                    stamps[i].append(time.perf_counter())
                if event.done is not None or event.error is not None:
                    left[0] -= 1
                    if not left[0]:
                        batcher.stop()
            return take

        start = time.perf_counter()
        for i, p in enumerate(prompts):
            batcher.submit(Sequence(lm.tokenizer.encode(p), SamplingParams(max_new_tokens=n), sink(i),
                                    ignore_eos=True))
        batcher.run()  # on this thread, as `slm serve` runs it
        return start, stamps

    run(["Warm up"], 8)
    _, (single,) = run([PROMPTS[0]], tokens)
    start, streams = run([PROMPTS[i % len(PROMPTS)] for i in range(clients)], tokens)
    aggregate = sum(len(s) for s in streams) / (max(s[-1] for s in streams) - start)
    return {"single_tok_s": stream_rate(single), "clients": clients, "aggregate_tok_s": aggregate}


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
    ap.add_argument("--quant", default="auto", help="as `slm serve --quant` (default: the file's own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--soak", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3, help="alternating in-process / server rounds (medians kept)")
    ap.add_argument("--output", default=None)
    ap.add_argument("--engine-only", help=argparse.SUPPRESS)  # step 0's worker process
    args = ap.parse_args()
    if args.engine_only:
        print(json.dumps(engine_only(*json.loads(args.engine_only))))
        return
    proc, base = start_server(args.model, "--model-id", MODEL, "--max-batch", str(args.max_batch),
                              "--threads", str(args.threads), "--quant", args.quant)
    report = {"model": args.model, "quant": args.quant, "threads": args.threads, "cpu": cpu_name()}
    try:
        asyncio.run(concurrency(base, 1, 8))  # warm: first allocations and kernels
        time.sleep(2)
        report["rss_before_mb"] = rss_mb(proc.pid)
        rounds = []
        for r in range(args.rounds):  # baseline and server alternate, so the machine's noise hits both alike
            baseline = in_process(args.model, args.quant, args.threads, args.max_batch, args.clients, args.tokens)
            c = asyncio.run(concurrency(base, args.clients, args.tokens))
            c["in_process"] = baseline
            c["single_vs_in_process"] = c["single_tok_s"] / baseline["single_tok_s"]
            c["aggregate_vs_in_process"] = c["aggregate_tok_s"] / baseline["aggregate_tok_s"]
            print(f"round {r + 1}:", json.dumps(c), flush=True)
            rounds.append(c)
        report["rounds"] = rounds
        report["in_process"] = {k: median([c["in_process"][k] for c in rounds])
                                for k in ("single_tok_s", "aggregate_tok_s")}
        report["concurrency"] = c = {k: median([c[k] for c in rounds]) for k in
                                     ("single_tok_s", "aggregate_tok_s", "ratio", "wall_s", "single_vs_in_process",
                                      "aggregate_vs_in_process")}
        c["clients"], c["errors"] = args.clients, sum(r["errors"] for r in rounds)
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
