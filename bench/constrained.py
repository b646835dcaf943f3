"""The cost of constrained decoding (JSON schema) per generated token, beside the same generation unconstrained.

    .venv/bin/python bench/constrained.py [--model smollm2-135m-instruct] [--threads 2] [--repeats 5]

For batch sizes 1 and 8: greedy chat generation under a small "person" schema (the constrained run decides the
token count n), then the same prompts unconstrained with end-of-sequence banned so that they run exactly n
tokens too. Decode time per token = (time for n tokens - time for 1 token) / (n - 1), so prefill is left out.
"warm" reuses the compiled constraint and its token masks (what a server sees for a repeated schema); "cold"
computes every token mask anew in the timed run (the DFA itself is compiled once: its time is printed
first). Median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import slmkit
from slmkit.engine.constrain import json_schema_constraint
from slmkit.engine.sampling import BannedTokens

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
    "city": {"type": "string", "maxLength": 20},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"]}
PROMPTS = ["Give me a JSON object describing a person.", "Describe a famous scientist as JSON.",
           "JSON for a character in a novel, please.", "Describe your best friend as a JSON object."]


class Timed:
    """A logits processor wrapper that adds up the time spent in the processor."""

    def __init__(self, proc):
        self.proc, self.seconds, self.calls = proc, 0.0, 0

    def __call__(self, logits, context):
        start = time.perf_counter()
        out = self.proc(logits, context)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lm = slmkit.load(args.model, threads=args.threads)
    ban_eos = BannedTokens(sorted(lm.eos_ids))
    start = time.perf_counter()
    constraint = json_schema_constraint(SCHEMA)
    print(f"compile: {1000 * (time.perf_counter() - start):.0f} ms, {constraint.dfa.num_states} DFA states")
    for batch in (1, 8):
        chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch)]

        inside: dict[str, list[float]] = {"warm": [], "cold": []}

        def constrained(n: int, fresh: bool = False):
            c = json_schema_constraint(SCHEMA) if fresh else constraint  # fresh: new token masks
            proc = Timed(c.processor(lm.tokenizer, lm.eos_ids))
            out = lm.complete_chats(chats, max_new_tokens=n, logits_processors=[proc])
            if n > 1:
                inside["cold" if fresh else "warm"].append(proc.seconds / proc.calls)
            return out

        done = constrained(400)
        n = max(len(c.token_ids) for c in done)
        print(f"batch {batch}: {n} tokens, e.g. {done[0].text}")
        results = {}
        runs = {
            "unconstrained": lambda k: lm.complete_chats(chats, max_new_tokens=k, logits_processors=[ban_eos]),
            "constrained, warm": lambda k: constrained(k),
            "constrained, cold": lambda k: constrained(k, fresh=True),
        }
        for name, run in runs.items():
            per_token = []
            for _ in range(args.repeats):
                full, first = timed(lambda: run(n)), timed(lambda: run(1))
                per_token.append((full - first) / (n - 1))
            results[name] = statistics.median(per_token)
        base = results["unconstrained"]
        for name, value in results.items():
            print(f"  {name:18s} {1000 * value:6.1f} ms/step  ({100 * (value / base - 1):+.0f} %)")
        for name, values in inside.items():
            print(f"  in the processor, {name}: {1000 * statistics.median(values):.2f} ms/step")


if __name__ == "__main__":
    main()
