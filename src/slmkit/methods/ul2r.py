"""UL2R (Tay et al., "Transcending Scaling Laws with 0.1% Extra Compute", U-PaLM, 2023).

Algorithm: take a converged causal LM and continue it for a small fraction of its pretraining tokens on
UL2's mixture of denoisers -- U-PaLM's mix: 50 % prefix LM (S), 25 % regular span corruption (R), 25 %
extreme (X), each example led by its mode token -- trained as a prefix LM: bidirectional attention over the
input, causal over the target. Evaluated with the prefix read both ways, it should keep its perplexity,
gain infilling, and do better on prompted tasks.

The experiment (`slm ul2r CONFIG.yaml`): the checkpoint gets the mode tokens and sentinels (new embedding and
head rows, initialised to the mean row); branch ``causal`` continues it as a causal LM for N tokens, branch
``ul2r`` on the mixture for the same N, from the same shards; the base and both branches are scored on
held-out perplexity, infilling of masked spans in held-out windows, and prompted tasks (the ``ul2r`` model
both with its prefix attended bidirectionally after ``[S2S]`` and causally).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SlmError
from ..train.common import positive_int, write_atomically
from ..train.config import parse_section, read_config_file
from ..train.denoisers import MODE_TOKENS, prefix_lm_mask
from ..train.seq2seq_tasks import SENTINELS


@dataclass
class UL2RConfig:
    checkpoint: str = "runs/tinyllama-10m/model"  # a converged causal LM (HF folder)
    shards: str = ""  # its prepared corpus (default: the checkpoint's run folder's data/)
    pretraining_tokens: int = 20_504_576  # the checkpoint's pretraining budget
    fraction: float = 0.01  # extra tokens per branch, as a fraction of pretraining_tokens
    sentinels: int = 64
    mixture: str = "upalm"
    weights: list[float] = field(default_factory=list)
    seq_len: int = 256
    lr: float = 1.0e-4
    micro_batch_size: int = 16
    grad_accum: int = 2
    eval_windows: int = 200  # held-out windows for perplexity
    infill_items: int = 300  # held-out windows with one masked span each
    infill_span: list[int] = field(default_factory=lambda: [1, 3])  # span lengths (tokens), inclusive range
    infill_context: int = 48  # tokens on each side of the span
    tasks: list[str] = field(default_factory=lambda: ["lambada", "sst2", "arc_easy"])
    num_fewshot: list[int] = field(default_factory=lambda: [0, 3])
    limit: int = 500
    seed: int = 0
    threads: int = 0
    out_dir: str = "runs/ul2r"
    data_dir: str | None = None


def load_config(path: str | Path, overrides: list[str] | None = None) -> UL2RConfig:
    cfg = parse_section(UL2RConfig, read_config_file(path, overrides), "ul2r")
    check_config(cfg)
    return cfg


def check_config(cfg: UL2RConfig) -> None:
    for name in ("pretraining_tokens", "sentinels", "seq_len", "micro_batch_size", "grad_accum", "eval_windows",
                 "infill_items", "infill_context", "limit"):
        if not positive_int(getattr(cfg, name)):
            raise SlmError(f"config: {name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if not 0 < cfg.fraction <= 1:
        raise SlmError(f"config: fraction must be in (0, 1], got {cfg.fraction}")
    if len(cfg.infill_span) != 2 or not 1 <= cfg.infill_span[0] <= cfg.infill_span[1]:
        raise SlmError(f"config: infill_span must be [shortest, longest] with 1 <= shortest <= longest, "
                       f"got {cfg.infill_span}")


# ------------------------------------------------------------------------------------- the base
def prepare_base(checkpoint: Path, out: Path, sentinels: int) -> Path:
    """The checkpoint with the mode tokens and ``sentinels`` sentinels added (special tokens; new embedding and
    head rows set to the mean of the existing ones), written once to ``out``."""
    from tokenizers import AddedToken

    from ..api import load
    from ..formats.hf import write_hf

    if (out / "config.json").is_file():
        return out
    lm = load(str(checkpoint), quant="none")
    tok = lm.tokenizer
    new = [t for t in (*MODE_TOKENS.values(), *SENTINELS[:sentinels]) if tok.token_to_id(t) is None]
    tok.backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in new])
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    vocab = tok.vocab_size
    cfg = lm.config
    grow = vocab - cfg.vocab_size
    if grow > 0:
        for key in ("embed.weight", "lm_head.weight"):
            if key in state:
                table = state[key]
                state[key] = torch.cat([table, table.mean(0, keepdim=True).expand(grow, -1)])
        cfg.vocab_size = vocab
    return write_hf(out, cfg, state, tok)


def branch_config(cfg: UL2RConfig, task: str, base: Path, shards: Path, out: Path) -> dict:
    tokens = int(cfg.pretraining_tokens * cfg.fraction)
    raw = {"task": task, "out_dir": str(out), "model": {"init": str(base)},
           "data": {"shards": str(shards), "seq_len": cfg.seq_len},
           "optim": {"lr": cfg.lr, "min_lr": cfg.lr / 10, "warmup_steps": 5, "betas": [0.9, 0.95],
                     "weight_decay": 0.1, "grad_clip": 1.0},
           "run": {"micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum, "max_tokens": tokens,
                   "eval_every": 10 ** 9, "eval_batches": 4, "seed": cfg.seed, "progress": True}}
    if cfg.threads:
        raw["run"]["threads"] = cfg.threads
    if task == "ul2r":
        raw["ul2r"] = {"mixture": cfg.mixture, "weights": list(cfg.weights)}
    return raw


# ---------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def heldout_perplexity(model, dataset, windows: int) -> float:
    """Perplexity of the causal LM loss over the first ``windows`` held-out windows (plain causal attention)."""
    total, count = 0.0, 0
    n = min(windows, len(dataset))
    for start in range(0, n, 8):
        rows = torch.from_numpy(np.stack([dataset.window(i) for i in range(start, min(n, start + 8))]).astype(np.int64))
        logits = model(rows[:, :-1]).float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    return float(np.exp(total / count))


def infill_items(cfg: UL2RConfig, dataset) -> list[tuple[list[int], list[int], list[int]]]:
    """(left, span, right) token lists from held-out windows, the span's length drawn from ``infill_span``."""
    rng = np.random.default_rng(cfg.seed + 17)
    c = cfg.infill_context
    items = []
    for i in range(min(cfg.infill_items, len(dataset))):
        window = dataset.window(len(dataset) - 1 - i).tolist()  # from the end: away from the perplexity windows
        k = int(rng.integers(cfg.infill_span[0], cfg.infill_span[1] + 1))
        if len(window) < 2 * c + k:
            raise SlmError(f"infill: windows of {len(window)} tokens are too short for {c} + {k} + {c}")
        items.append((window[:c], window[c:c + k], window[c + k:2 * c + k]))
    return items


@torch.inference_mode()
def greedy(model, prompt: list[int], steps: int, prefix_lm: bool, stop: set[int]) -> list[int]:
    """Greedy tokens after ``prompt`` (the prompt read bidirectionally when ``prefix_lm``); recomputed each step."""
    ids = list(prompt)
    for _ in range(steps):
        x = torch.tensor([ids])
        mask = prefix_lm_mask(torch.tensor([len(prompt)]), len(ids)) if prefix_lm else None
        token = int(model(x, attn_mask=mask)[0, -1].argmax())
        if token in stop:
            break
        ids.append(token)
    return ids[len(prompt):]


@torch.inference_mode()
def span_logprob(model, prompt: list[int], span: list[int], prefix_lm: bool) -> float:
    """Mean log-probability per token of ``span`` right after ``prompt``."""
    ids = torch.tensor([prompt + span])
    mask = prefix_lm_mask(torch.tensor([len(prompt)]), ids.shape[1]) if prefix_lm else None
    logp = torch.log_softmax(model(ids, attn_mask=mask)[0, len(prompt) - 1:-1].float(), -1)
    return float(logp.gather(1, torch.tensor(span)[:, None]).mean())


def infill_accuracy(model, tokenizer, items, prefix_lm: bool) -> dict:
    """On each (left, span, right): ``infill_exact``, the greedy answer in UL2's format ([NLU] left <extra_id_0>
    right <extra_id_0> -> span) is the span; ``infill_logprob``, the span's mean log-probability per token in
    that format; ``continue_exact``, the span is the greedy continuation of the left context alone (what a
    causal LM can do)."""
    sentinel, mode = tokenizer.token_to_id(SENTINELS[0]), tokenizer.token_to_id(MODE_TOKENS["R"])
    stop = set(tokenizer.eos_ids) | {tokenizer.token_to_id(s) for s in SENTINELS}
    infill = cont = 0
    logprob = 0.0
    for left, span, right in items:
        prompt = [mode, *left, sentinel, *right, sentinel]
        infill += greedy(model, prompt, len(span) + 1, prefix_lm, stop) == span
        logprob += span_logprob(model, prompt, span, prefix_lm)
        cont += greedy(model, left, len(span), False, set())[:len(span)] == span
    n = len(items)
    return {"infill_exact": infill / n, "infill_logprob": logprob / n, "continue_exact": cont / n}


def prompted(lm, cfg: UL2RConfig, prefix_lm: bool) -> dict:
    from ..eval.harness import evaluate

    out = {}
    for shots in cfg.num_fewshot:
        report = evaluate(lm, cfg.tasks, limit=cfg.limit, num_fewshot=shots, data_dir=cfg.data_dir,
                          progress=False, prefix_lm=prefix_lm, lead=MODE_TOKENS["S"] if prefix_lm else None)
        for task, metrics in report["results"].items():
            out[f"{task} {shots}-shot"] = metrics.get("acc")
    return out


# -------------------------------------------------------------------------------------- the run
def run(cfg: UL2RConfig) -> dict:
    """Prepare the base, train both branches (each reused when done), evaluate; writes results.json / .md."""
    from ..api import load
    from ..train.corpus import PackedDataset
    from ..train.run import train_stage

    check_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    checkpoint = Path(cfg.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise SlmError(f"checkpoint: {checkpoint} is not a model folder (no config.json); train it first, e.g. "
                       "slm pretrain configs/tinyllama-10m-pretrain.yaml")
    shards = Path(cfg.shards) if cfg.shards else checkpoint.parent / "data"
    if not (shards / "meta.json").is_file():
        raise SlmError(f"shards: {shards} holds no prepared corpus (meta.json); set shards to the checkpoint's data")
    base = prepare_base(checkpoint, out / "base", cfg.sentinels)
    paths = {"base": base}
    for name, task in (("causal", "pretrain"), ("ul2r", "ul2r")):
        paths[name] = train_stage(branch_config(cfg, task, base, shards, out / name), name, "ul2r")

    val = PackedDataset(shards, "val", cfg.seq_len)
    items = infill_items(cfg, val)
    rows = {}
    for name, path in paths.items():
        lm = load(str(path), quant="none")
        model = lm.model.eval()
        print(f"ul2r: evaluating {name}", file=sys.stderr)
        row = {"perplexity": heldout_perplexity(model, val, cfg.eval_windows)}
        row.update(infill_accuracy(model, lm.tokenizer, items, prefix_lm=False))
        row.update(prompted(lm, cfg, prefix_lm=False))
        rows[name] = row
        if name == "ul2r":
            rows["ul2r, prefix read both ways"] = {**infill_accuracy(model, lm.tokenizer, items, prefix_lm=True),
                                                   **prompted(lm, cfg, prefix_lm=True)}
    results = {"config": {k: v for k, v in vars(cfg).items()}, "extra_tokens": int(cfg.pretraining_tokens * cfg.fraction),
               "models": rows, "perplexity_change": rows["ul2r"]["perplexity"] / rows["causal"]["perplexity"] - 1,
               "minutes": (time.time() - started) / 60}
    write_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(out / "results.md", table(results))
    return results


def table(results: dict) -> str:
    rows = results["models"]
    columns = sorted({k for r in rows.values() for k in r}, key=lambda k: (k != "perplexity", "infill" not in k and "exact" not in k, k))
    head = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for name, row in rows.items():
        cells = []
        for c in columns:
            v = row.get(c)
            plain = c in ("perplexity", "infill_logprob")
            cells.append("-" if v is None else f"{v:.2f}" if plain else f"{100 * v:.1f}")
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return (f"UL2R vs causal continuation, {results['extra_tokens']:,} extra tokens each; perplexity change "
            f"{100 * results['perplexity_change']:+.2f} %\n\n" + head + body)
