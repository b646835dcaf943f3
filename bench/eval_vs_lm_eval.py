"""slmkit's harness against lm-evaluation-harness on the same weights and the same data files.

The GGUF is dequantized and written as a Hugging Face folder (float32), which lm-evaluation-harness runs
through its transformers backend ("hf") with the task configs in bench/lm_eval_tasks/ (local files,
the same prompts as slmkit's built-in tasks); slmkit scores the same folder. Per task it prints both
figures, their difference, how many items were predicted differently and the largest difference in
a choice's log-likelihood.

    python bench/eval_vs_lm_eval.py --lm-eval /path/to/venv/bin/lm_eval \
        --tasks arc_easy,piqa,hellaswag:1000 --output bench/results/eval_vs_lm_eval.json

lm-evaluation-harness is not a dependency of slmkit; install it in its own environment
(``pip install lm_eval transformers==5.24.0 torch==2.13.0``) and pass its ``lm_eval`` executable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _serving import start_server

HERE = Path(__file__).parent
REPO = HERE.parent


def lm_eval_tasks(data_dir: Path, folder: Path) -> None:
    for src in (HERE / "lm_eval_tasks").glob("*.yaml"):
        (folder / src.name).write_text(src.read_text().replace("DATA_DIR", str(data_dir.resolve())))


def run_lm_eval(exe: str, hf_dir: Path, task: str, limit: int | None, batch_size: int, data_dir: Path,
                threads: int, server: str | None = None) -> tuple[dict, list[dict], float]:
    """lm-evaluation-harness on the HF folder with its transformers backend, or (``server``, a base URL)
    through its ``local-completions`` backend against a running ``slm serve``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tasks").mkdir()
        lm_eval_tasks(data_dir, tmp / "tasks")
        if server:
            model = ["--model", "local-completions", "--model_args",
                     f"base_url={server}/v1/completions,model=served,tokenizer_backend=remote,"
                     "tokenized_requests=True,max_retries=1", "--batch_size", str(batch_size)]
        else:
            model = ["--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32", "--device", "cpu",
                     "--batch_size", str(batch_size)]
        cmd = [exe, *model, "--tasks", f"slm_{task}", "--include_path", str(tmp / "tasks"),
               "--output_path", str(tmp / "out"), "--log_samples"]
        if limit:
            cmd += ["--limit", str(limit)]
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads),
                   TOKENIZERS_PARALLELISM="false")
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        results = json.loads(next((tmp / "out").rglob("results_*.json")).read_text())["results"][f"slm_{task}"]
        samples = [json.loads(line) for line in next((tmp / "out").rglob(f"samples_slm_{task}_*.jsonl")).open()]
    samples.sort(key=lambda s: s["doc_id"])
    return results, samples, seconds


def run_slmkit(hf_dir: Path, task: str, limit: int | None, batch_size: int, data_dir: Path,
               threads: int) -> tuple[dict, list[dict], float]:
    import slmkit
    from slmkit.eval import evaluate

    lm = slmkit.load(hf_dir, threads=threads)
    started = time.perf_counter()
    report = evaluate(lm, [task], limit=limit, batch_size=batch_size, data_dir=data_dir, progress=False)
    return report["results"][task], report["samples"][task], time.perf_counter() - started


def compare(task: str, ours: tuple, theirs: tuple) -> dict:
    (res, samples, sec), (lres, lsamples, lsec) = ours, theirs
    if len(samples) != len(lsamples):
        raise SystemExit(f"{task}: slmkit scored {len(samples)} items, lm-eval {len(lsamples)}")
    differ, max_lp = 0, 0.0
    for s, l in zip(samples, lsamples):
        theirs_lp = [float(r[0]) for r in l["filtered_resps"]]
        max_lp = max(max_lp, max(abs(a - b) for a, b in zip(s["logprobs"], theirs_lp)))
        differ += s["pred"] != max(range(len(theirs_lp)), key=lambda j: theirs_lp[j])
    row = {"task": task, "n": len(samples), "slmkit_seconds": round(sec, 1), "lm_eval_seconds": round(lsec, 1),
           "items_predicted_differently": differ, "max_abs_logprob_diff": max_lp}
    for m in ("acc", "acc_norm"):
        row[m] = {"slmkit": 100 * res[m], "lm_eval": 100 * lres[f"{m},none"],
                  "diff_points": 100 * (res[m] - lres[f"{m},none"])}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval", required=True, help="the lm_eval executable (its own environment)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag:1000", help="task[:limit],...")
    ap.add_argument("--data-dir", default=os.environ.get("SLMKIT_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--hf-dir", default=str(Path.home() / ".cache" / "slmkit" / "smollm2-135m-instruct-hf"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", default=None)
    ap.add_argument("--via-server", action="store_true",
                    help="lm-evaluation-harness scores through `slm serve` (local-completions), not transformers")
    args = ap.parse_args()

    import slmkit

    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "model.safetensors").is_file():
        print(f"writing the dequantized model to {hf_dir}", file=sys.stderr)
        slmkit.load(args.model).save(hf_dir)
    rows = []
    server = start_server(str(hf_dir), "--model-id", "served", "--threads", str(args.threads)) \
        if args.via_server else None
    try:
        for spec in args.tasks.split(","):
            rows.append(run_task(args, spec, hf_dir, server[1] if server else None))
    finally:
        if server:
            server[0].terminate()
            server[0].wait(30)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"model": args.model, "via_server": args.via_server, "rows": rows},
                                                indent=1))


def run_task(args, spec: str, hf_dir: Path, server: str | None) -> dict:
    task, _, limit = spec.partition(":")
    limit = int(limit) if limit else None
    if not (HERE / "lm_eval_tasks" / f"slm_{task}.yaml").is_file():
        known = sorted(p.stem.removeprefix("slm_") for p in (HERE / "lm_eval_tasks").glob("slm_*.yaml"))
        raise SystemExit(f"no lm-evaluation-harness config for {task!r} in bench/lm_eval_tasks (have: {', '.join(known)})")
    print(f"{task}: lm-evaluation-harness{' via slm serve' if server else ''} ...", file=sys.stderr)
    theirs = run_lm_eval(args.lm_eval, hf_dir, task, limit, args.batch_size, Path(args.data_dir), args.threads,
                         server)
    print(f"{task}: slmkit ...", file=sys.stderr)
    ours = run_slmkit(hf_dir, task, limit, args.batch_size, Path(args.data_dir), args.threads)
    r = compare(task, ours, theirs)
    print(f"{task:<10} n={r['n']:<5} acc {r['acc']['slmkit']:.2f} vs {r['acc']['lm_eval']:.2f} "
          f"({r['acc']['diff_points']:+.2f})  acc_norm {r['acc_norm']['slmkit']:.2f} vs "
          f"{r['acc_norm']['lm_eval']:.2f} ({r['acc_norm']['diff_points']:+.2f})  "
          f"differing items {r['items_predicted_differently']}  max |dlogp| {r['max_abs_logprob_diff']:.2e}  "
          f"time {r['slmkit_seconds']}s vs {r['lm_eval_seconds']}s", flush=True)
    return r


if __name__ == "__main__":
    main()
