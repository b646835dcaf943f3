"""Top-1 agreement and perplexity of slmkit against llama.cpp on the same GGUF (the figures in docs/models.md).

    .venv/bin/python bench/parity_llama_cpp.py [--quant none|int8|int4] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from llama_ref import open_llama

import slmkit
from slmkit.formats.registry import REGISTRY, locate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="none")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    data = Path(os.environ.get("SLMKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = locate(REGISTRY["smollm2-135m-instruct"])
    lm = slmkit.load(path, quant=args.quant)
    with (data / "pretrain_corpus" / "nltk_gutenberg.jsonl").open() as f:
        doc = json.loads(f.readline())
    ids = lm.tokenizer.encode(" ".join(doc["text"].split()[200:600]))[:args.tokens]
    ours = lm.logits(ids)[0]
    ref_model = open_llama(str(path), n_ctx=args.tokens + 8, logits_all=True, n_threads=2, verbose=False)
    ref_model.eval(ids)
    ref = torch.tensor(ref_model.scores[:args.tokens], dtype=torch.float32)

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())

    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"quant={args.quant} tokens={len(ids)} top-1 agreement {agreement:.4f} "
          f"perplexity slmkit {ppl(ours):.3f} llama.cpp {ppl(ref):.3f} ({ppl(ours) / ppl(ref) - 1:+.2%})")


if __name__ == "__main__":
    main()
