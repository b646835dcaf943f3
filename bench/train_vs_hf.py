"""Training throughput of slmkit's Trainer beside transformers' Trainer: one model config, one batch,
the same token windows, one run.

Copy-paste (from the repository root, after ``make install-test``):

    # the figure in docs/training.md: the from-scratch config's model, bf16 and fp32, 20 timed steps each
    .venv/bin/python bench/train_vs_hf.py --json bench/results/train_vs_hf.json

    # a smoke test (the figures mean nothing)
    .venv/bin/python bench/train_vs_hf.py --steps 2 --warmup 1 --precisions fp32 --layers 2

What is measured: each engine trains in its own subprocess, one after the other, from the same initial
weights (slmkit's init, copied into transformers' LlamaForCausalLM under HF's names; the first batch's
loss is printed by both as a check that model and data are the same) on windows of packed tokens from
``pretrain_corpus`` (a byte-level BPE of ``--vocab`` tokens trained on it; shards cached in
``--cache``). Both take the same optimizer settings (AdamW 0.9/0.95, wd 0.1, clip 1.0, cosine with
warmup: slmkit's ``lr_at``, handed to transformers as a ``LambdaLR``, since its own ``cosine`` starts the
warm-up at lr 0, one step behind, and decays to 0 instead of ``min_lr``), micro-batch, gradient
accumulation and precision (transformers: ``bf16=True`` is its CPU autocast). tokens/s is the tokens of
the timed optimizer steps (after ``--warmup`` untimed steps, which also absorb torch.compile's
compilation) over their wall time. slmkit runs with its defaults for this config (torch.compile on);
``--slm-eager`` adds a row without compilation, ``--hf-compile`` a row with transformers'
``torch_compile=True``, ``--hf-malloc`` a row of transformers with the glibc malloc settings slmkit's
trainer applies to its own process; ``--only`` runs the named rows alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SLMKIT_DATA", ROOT.parent / "shared" / "data"))


def model_fields(args) -> dict:
    return dict(family="llama", hidden_size=args.hidden, n_layers=args.layers, n_heads=args.heads,
                n_kv_heads=args.kv_heads, intermediate_size=args.intermediate, max_position_embeddings=args.seq_len,
                tie_word_embeddings=False)


def prepare(args) -> Path:
    """Tokenizer + shards for the benchmark corpus (cached)."""
    from slmkit.train.bpe import train_bpe
    from slmkit.train.corpus import prepare_corpus

    cache = Path(args.cache)
    files = [str(DATA / "pretrain_corpus" / name) for name in args.corpus.split(",")]
    if not (cache / "tokenizer" / "tokenizer.json").is_file():
        train_bpe(files, cache / "tokenizer", vocab_size=args.vocab)
    if not (cache / "data" / "meta.json").is_file():
        prepare_corpus(files, cache / "tokenizer", cache / "data", workers=2, val_fraction=0.01, progress=False)
    return cache


def initial_weights(args, cache: Path) -> Path:
    """slmkit's initial model saved in HF layout: both engines start from these exact weights."""
    from slmkit.config import ModelConfig
    from slmkit.formats.hf import write_hf
    from slmkit.models.decoder import Decoder
    from slmkit.tokenizer import Tokenizer
    from slmkit.train.decoder_parts import init_weights

    import torch

    folder = cache / f"init-{args.layers}x{args.hidden}"
    tok = Tokenizer.from_hf_dir(cache / "tokenizer")
    cfg = ModelConfig(vocab_size=args.vocab, **model_fields(args))
    torch.manual_seed(0)
    model = Decoder(cfg)
    init_weights(model, 0.02)
    write_hf(folder, cfg, model.state_dict(), tok)
    return folder


def train_config(args, cache: Path, precision: str, compile_: bool, out: Path) -> dict:
    return {
        "task": "pretrain", "out_dir": str(out),
        "model": {"init": str(cache / f"init-{args.layers}x{args.hidden}")},
        "data": {"shards": str(cache / "data"), "seq_len": args.seq_len},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0,
                  "schedule": "cosine", "warmup_steps": 5},
        "run": {"micro_batch_size": args.batch, "grad_accum": args.accum, "max_steps": args.warmup + args.steps,
                "precision": precision, "compile": compile_, "threads": args.threads, "progress": False,
                "eval_every": 10 ** 9, "save_every": 10 ** 9},
    }


# ------------------------------------------------------------------------------------------ engines
def run_slmkit(spec: dict) -> dict:
    import torch

    from slmkit.train.config import config_from_dict
    from slmkit.train.distributed import Dist
    from slmkit import memory
    from slmkit.train.registry import get_task
    from slmkit.train.trainer import Trainer

    memory.enter_phase("training")
    torch.set_num_threads(spec["threads"])
    cfg = config_from_dict(spec["config"])
    parts = get_task(cfg.task).build(cfg, Dist())
    trainer = Trainer(parts.model, parts.train, cfg, Dist())
    trainer.loss_module.train()
    losses, times = [], []
    for step in range(cfg.run.max_steps):
        t0 = time.perf_counter()
        loss, _, _ = trainer.train_step(step)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return {"losses": losses, "step_s": times}


def run_hf(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from slmkit.train.corpus import PackedDataset

    torch.set_num_threads(spec["threads"])
    if spec.get("hf_malloc"):  # the glibc settings slmkit's trainer applies to itself
        from slmkit import memory

        memory.enter_phase("training")
    cfg = spec["config"]
    run, optim = cfg["run"], cfg["optim"]
    data = PackedDataset(cfg["data"]["shards"], "train", cfg["data"]["seq_len"])
    n = run["micro_batch_size"] * run["grad_accum"] * run["max_steps"]

    class Windows(torch.utils.data.Dataset):  # the same windows, in slmkit's order
        def __len__(self):
            return n

        def __getitem__(self, k):
            w = torch.from_numpy(data.sample(k, 0).astype(np.int64))
            return {"input_ids": w[:-1], "labels": w[1:]}

    class ShiftedLlama(LlamaForCausalLM):
        """labels arrive already shifted (as slmkit's batches do): score them position by position."""

        def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kw):
            out = super().forward(input_ids=input_ids, **kw)
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                                                     reduction="sum")
            out.loss = loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())
            return out

    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    model = ShiftedLlama.from_pretrained(cfg["model"]["init"], dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=run["micro_batch_size"],
        gradient_accumulation_steps=run["grad_accum"], max_steps=run["max_steps"], learning_rate=optim["lr"],
        weight_decay=optim["weight_decay"], adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=optim["grad_clip"],
        logging_steps=1, save_strategy="no",  # the schedule: InOrder.create_scheduler
        report_to=[], use_cpu=True, bf16=run["precision"] == "bf16", dataloader_num_workers=0,
        torch_compile=spec.get("hf_compile", False), disable_tqdm=True, seed=0)

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):
            """slmkit's schedule, step for step: transformers' "cosine" takes lr 0 at step 0 (its warm-up is
            one step behind lr_at's) and decays to 0 at max_steps, not to min_lr at the last step."""
            from torch.optim.lr_scheduler import LambdaLR

            from slmkit.train.schedule import lr_at

            kw = dict(lr=optim["lr"], min_lr=optim["min_lr"], warmup_steps=optim["warmup_steps"],
                      schedule=optim["schedule"])
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer,
                                             lambda s: lr_at(s, num_training_steps, **kw) / optim["lr"])
            return self.lr_scheduler

    InOrder(model=model, args=targs, train_dataset=Windows(), callbacks=[Clock()]).train()
    return {"losses": losses, "step_s": times}


def child(engine: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = (run_slmkit if engine == "slmkit" else run_hf)(spec)
    Path(spec["result"]).write_text(json.dumps(result))


def measure(engine: str, spec: dict, work: Path, label: str) -> dict:
    spec_file, result_file = work / f"{label}.spec.json", work / f"{label}.result.json"
    spec = {**spec, "result": str(result_file), "out": str(work / label)}
    spec_file.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", engine, str(spec_file)], check=True)
    result = json.loads(result_file.read_text())
    timed = result["step_s"][spec["warmup"]:]
    tokens = spec["tokens_per_step"] * len(timed)
    return {"engine": label, "tokens_per_s": tokens / sum(timed), "first_loss": result["losses"][0],
            "last_loss": result["losses"][-1], "warmup_s": sum(result["step_s"][:spec["warmup"]]),
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--corpus", default="nltk_gutenberg.jsonl,nltk_reuters21578_apte.jsonl")
    p.add_argument("--cache", default=str(ROOT / "bench" / ".cache" / "train"))
    p.add_argument("--slm-eager", action="store_true", help="also time slmkit without torch.compile")
    p.add_argument("--hf-compile", action="store_true", help="also time transformers with torch_compile=True")
    p.add_argument("--hf-malloc", action="store_true",
                   help="also time transformers with slmkit's glibc malloc settings (slmkit.memory's training phase)")
    p.add_argument("--only", default=None, help="comma-separated row labels to run (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = prepare(args)
    initial_weights(args, cache)
    work = cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision in args.precisions.split(","):
        base = {"threads": args.threads, "warmup": args.warmup,
                "tokens_per_step": args.batch * args.accum * args.seq_len}
        plan = [("slmkit", f"slmkit-{precision}", True, {})]
        if args.slm_eager:
            plan.append(("slmkit", f"slmkit-eager-{precision}", False, {}))
        plan.append(("hf", f"transformers-{precision}", False, {}))
        if args.hf_compile:
            plan.append(("hf", f"transformers-compile-{precision}", False, {"hf_compile": True}))
        if args.hf_malloc:
            plan.append(("hf", f"transformers-malloc-{precision}", False, {"hf_malloc": True}))
        if args.only:
            plan = [row for row in plan if row[1] in args.only.split(",")]
        for engine, label, compile_, extra in plan:
            spec = {**base, **extra, "config": train_config(args, cache, precision, compile_, work / label)}
            rows.append({"precision": precision, **measure(engine, spec, work, label)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'engine':<28}{'tokens/s':>10}{'vs HF':>8}{'1st loss':>10}{'last loss':>10}{'warm-up s':>10}")
    for row in rows:
        hf = next((r for r in rows if r["engine"] == f"transformers-{row['precision']}"), None)
        ratio = row["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan")
        print(f"{row['engine']:<28}{row['tokens_per_s']:>10.0f}{ratio:>7.2f}x"
              f"{row['first_loss']:>10.4f}{row['last_loss']:>10.4f}{row['warmup_s']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
