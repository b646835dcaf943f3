"""Emulated fine-tuning (Mitchell et al., "An Emulator for Fine-Tuning Large Language Models using Small
Language Models", ICLR 2024), with speculative decoding (Leviathan et al. 2023).

EFT reads a fine-tuned model as its base plus a per-token log-ratio and moves that ratio across scales:
up-scaling samples log p = log p_large_base + beta * (log p_small_ft - log p_small_base), renormalised over
the vocabulary at every token (down-scaling swaps the roles). The experiment trains a family with one
tokenizer (SmolLM2's): a small and a large base pretrained here, each fine-tuned on instruction data, and
compares large-base, small-ft, EFT up-scaled and true large-ft on held-out instructions (assistant-token
log-likelihood, answer ROUGE-L, end-of-turn rate). Speculative decoding drafts with the small fine-tuned
model against the EFT ensemble, and with a draft distilled from SmolLM2-135M-Instruct (its first layers,
trained on the teacher's token distributions) against SmolLM2 itself. ``slm eft CONFIG.yaml`` runs it all.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SlmError
from ..train.common import data_path, positive_int, write_atomically
from ..train.config import parse_section, read_config_file
from ..train.registry import register_task


# ------------------------------------------------------------------------------------------------ config
@dataclass
class BaseModelSection:
    """One base model of the family, pretrained from scratch on ``corpus``."""

    config: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (family llama)
    pretrain_tokens: int = 1_000_000
    lr: float = 2.0e-3
    finetune_lr: float = 1.0e-3


@dataclass
class FinetuneSection:
    steps: int = 120  # chat SFT steps of each base (micro_batch_size conversations packed into seq_len rows)
    micro_batch_size: int = 8
    seq_len: int = 512


@dataclass
class DraftSection:
    teacher: str = "smollm2-135m-instruct"  # the target of speculative decoding, and the draft's teacher
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 29])  # teacher layers the draft keeps
    steps: int = 150
    micro_batch_size: int = 4
    lr: float = 3.0e-4
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the KL to the teacher (1 - alpha: cross-entropy on the data)
    quant: str = "none"  # the draft's form when decoding: none (float32) | int8 | int4


@dataclass
class EvalSection:
    heldout_examples: int = 100  # held out of `instructions` when `heldout` is not given
    answers: int = 40  # held-out prompts answered by each arm (greedy)
    max_new_tokens: int = 96
    betas: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])  # up-scaling strengths measured


@dataclass
class SpeculativeSection:
    prompts: int = 20  # held-out prompts decoded by each speculative arm
    max_new_tokens: int = 96
    gammas: list[int] = field(default_factory=lambda: [2, 4])


@dataclass
class EFTConfig:
    out_dir: str = "runs/eft"
    data_dir: str | None = None  # relative data paths are read here (default $SLMKIT_DATA)
    tokenizer: str = "smollm2-135m-instruct"  # the family's tokenizer (and chat template) comes from this model
    corpus: list[str] = field(default_factory=lambda: ["pretrain_corpus"])
    instructions: str = "instruction/llamafactory_alpaca_en_demo.json"  # fine-tuning data (Alpaca / chat)
    heldout: str | None = None  # held-out instructions in the same format (else split off `instructions`)
    seed: int = 0
    precision: str = "auto"
    small: BaseModelSection = field(default_factory=BaseModelSection)
    large: BaseModelSection = field(default_factory=BaseModelSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    draft: DraftSection = field(default_factory=DraftSection)
    eval: EvalSection = field(default_factory=EvalSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)


_SUBSECTIONS = {"small": BaseModelSection, "large": BaseModelSection, "finetune": FinetuneSection,
                "draft": DraftSection, "eval": EvalSection, "speculative": SpeculativeSection}


def load_config(path: str | Path, overrides: list[str] | None = None) -> EFTConfig:
    return config_from_mapping(read_config_file(path, overrides))


def config_from_mapping(raw: dict) -> EFTConfig:
    if not isinstance(raw, dict):
        raise SlmError("config: the file must hold a mapping")
    values = {k: v for k, v in raw.items() if k not in _SUBSECTIONS}
    top = parse_section(EFTConfig, values, "eft")
    for name, cls in _SUBSECTIONS.items():
        setattr(top, name, parse_section(cls, raw.get(name), name))
    if isinstance(top.eval.betas, tuple):  # parse_section reads every `betas` key as a pair (optim's)
        top.eval.betas = list(top.eval.betas)
    check_config(top)
    return top


def check_config(cfg: EFTConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SlmError(f"config: {message}")

    for name in ("small", "large"):
        section = getattr(cfg, name)
        need(isinstance(section.config, dict) and section.config, f"{name}.config must give the model's sizes")
        need(positive_int(section.pretrain_tokens), f"{name}.pretrain_tokens must be an integer >= 1")
    need(isinstance(cfg.corpus, list) and cfg.corpus and all(isinstance(c, str) for c in cfg.corpus),
         f"corpus must be a list of paths, got {cfg.corpus!r}")
    for name in ("finetune.steps", "finetune.micro_batch_size", "draft.steps", "draft.micro_batch_size",
                 "eval.heldout_examples", "eval.max_new_tokens", "speculative.max_new_tokens"):
        section, key = name.split(".")
        need(positive_int(getattr(getattr(cfg, section), key)), f"{name} must be an integer >= 1")
    for name in ("eval.answers", "speculative.prompts"):
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{name} must be an integer >= 0")
    need(isinstance(cfg.eval.betas, list) and cfg.eval.betas
         and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in cfg.eval.betas),
         f"eval.betas must be a list of numbers, got {cfg.eval.betas!r}")
    need(isinstance(cfg.speculative.gammas, list) and cfg.speculative.gammas
         and all(positive_int(g) for g in cfg.speculative.gammas),
         f"speculative.gammas must be a list of integers >= 1, got {cfg.speculative.gammas!r}")
    need(isinstance(cfg.draft.layers, list) and cfg.draft.layers and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in cfg.draft.layers)
         and cfg.draft.layers == sorted(set(cfg.draft.layers)),
         f"draft.layers must be increasing layer indices, got {cfg.draft.layers!r}")
    need(0.0 <= cfg.draft.alpha <= 1.0, "draft.alpha must be within [0, 1]")
    need(cfg.draft.quant in ("none", "int8", "int4"), f"draft.quant must be none, int8 or int4, got {cfg.draft.quant!r}")


# ------------------------------------------------------------------------------------------------ paths
def _train(raw: dict, label: str) -> Path:
    from ..train.run import train_stage

    return train_stage(raw, label, "eft")


def family_tokenizer(cfg: EFTConfig, out: Path) -> Path:
    """The family's tokenizer folder (tokenizer.json + chat template), written once from ``cfg.tokenizer``."""
    from ..api import load

    folder = out / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        load(cfg.tokenizer).tokenizer.save(folder)
    return folder


def split_instructions(cfg: EFTConfig, out: Path) -> tuple[Path, Path]:
    """``train.json`` and ``heldout.json`` (lists of records in the instruction file's own format)."""
    from ..train.chat_data import load_conversations
    from ..train.common import json_records

    folder = out / "data"
    train, heldout = folder / "train.json", folder / "heldout.json"
    if train.is_file() and heldout.is_file():
        return train, heldout
    folder.mkdir(parents=True, exist_ok=True)
    source = data_path(cfg.instructions, cfg.data_dir)
    load_conversations(source)  # a bad record fails here, naming the file and the record
    records = [record for _, _, record in json_records(source, "instruction records")]
    if cfg.heldout:
        held_source = data_path(cfg.heldout, cfg.data_dir)
        load_conversations(held_source)
        held = [record for _, _, record in json_records(held_source, "instruction records")]
    else:
        if cfg.eval.heldout_examples >= len(records):
            raise SlmError(f"{source}: {len(records)} records, eval.heldout_examples={cfg.eval.heldout_examples} "
                           f"would leave none to fine-tune on")
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        held = [records[i] for i in sorted(order[:cfg.eval.heldout_examples])]
        records = [records[i] for i in sorted(order[cfg.eval.heldout_examples:])]
    write_atomically(heldout, json.dumps(held, ensure_ascii=False, indent=1))
    write_atomically(train, json.dumps(records, ensure_ascii=False, indent=1))
    return train, heldout


# ------------------------------------------------------------------------------------------------ the family
def _run_section(cfg: EFTConfig, steps: int) -> dict:
    return {"precision": cfg.precision, "seed": cfg.seed, "max_steps": steps, "eval_every": max(1, steps // 4),
            "eval_batches": 8, "save_every": max(1, steps // 4), "log_every": 5}


def pretrain_base(cfg: EFTConfig, name: str, tokenizer: Path, out: Path) -> Path:
    section: BaseModelSection = getattr(cfg, name)
    micro, seq = 16, 256
    steps = max(1, section.pretrain_tokens // (micro * seq))
    corpus = [str(Path(data_path(c, cfg.data_dir)).resolve()) for c in cfg.corpus]
    raw = {
        "task": "pretrain", "out_dir": str((out / f"{name}-base").resolve()),
        "model": {"init": "scratch", "tokenizer": str(tokenizer.resolve()),
                  "config": {"family": "llama", "max_position_embeddings": 1024, "tie_word_embeddings": True,
                             **section.config}},
        "data": {"corpus": corpus, "shards": str((out / "corpus-shards").resolve()), "seq_len": seq,
                 "val_fraction": 0.01, "workers": 2},
        "optim": {"lr": section.lr, "min_lr": section.lr / 10, "warmup_steps": max(1, steps // 20),
                  "weight_decay": 0.1, "schedule": "cosine"},
        "run": {**_run_section(cfg, steps), "micro_batch_size": micro},
    }
    return _train(raw, f"pretrain {name} base ({steps} steps of {micro * seq} tokens)")


def finetune(cfg: EFTConfig, name: str, base: Path, train_file: Path, out: Path) -> Path:
    section: BaseModelSection = getattr(cfg, name)
    steps = cfg.finetune.steps
    raw = {
        "task": "sft", "out_dir": str((out / f"{name}-ft").resolve()),
        "model": {"init": str(base.resolve())},
        "data": {"chat": str(train_file.resolve()), "seq_len": cfg.finetune.seq_len, "val_fraction": 0.05},
        "optim": {"lr": section.finetune_lr, "min_lr": section.finetune_lr / 10, "warmup_steps": max(1, steps // 20),
                  "weight_decay": 0.0, "schedule": "cosine"},
        "run": {**_run_section(cfg, steps), "micro_batch_size": cfg.finetune.micro_batch_size},
    }
    return _train(raw, f"fine-tune {name} base ({steps} steps)")


# ------------------------------------------------------------------------------------------------ the draft
@dataclass
class DraftDistillSection:
    """Task ``draft_distill``: a draft keeping some of a teacher's layers, trained on its token distributions."""

    teacher: str = "smollm2-135m-instruct"
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 29])
    temperature: float = 1.0
    alpha: float = 1.0
    train_embeddings: bool = False  # the (tied) embedding and head stay the teacher's: a third of the cost


def truncated_copy(teacher, layers: list[int]):
    """A decoder with the teacher's embedding, final norm and head and the teacher's ``layers`` (in order)."""
    from ..models.decoder import Decoder

    if max(layers) >= teacher.cfg.n_layers:
        raise SlmError(f"draft.layers: the teacher has {teacher.cfg.n_layers} layers, got index {max(layers)}")
    cfg = dataclasses.replace(teacher.cfg, n_layers=len(layers),
                              layer_types=[teacher.cfg.layer_types[i] for i in layers])
    student = Decoder(cfg)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            if int(index) not in layers:
                continue
            key = f"layers.{layers.index(int(index))}.{rest}"
        state[key] = value.detach().clone()
    student.load_state_dict(state)
    return student, cfg


def build_draft(cfg, d):
    from ..train.chat_data import build_chat_dataset
    from ..train.decoder_parts import ChatBatches, decoder_saver, load_model
    from ..train.objectives import DistillationLoss
    from ..train.trainer import RunParts

    section: DraftDistillSection = cfg.method
    if not cfg.data.chat:
        raise SlmError("config: task draft_distill needs data.chat (an instruction or conversation file)")
    cfg.model.init = section.teacher
    teacher, _, tokenizer = load_model(cfg)
    teacher.eval().requires_grad_(False)
    student, student_cfg = truncated_copy(teacher, section.layers)
    student.train()
    if not section.train_embeddings:
        student.embed.weight.requires_grad_(False)
    train, val = build_chat_dataset(data_path(cfg.data.chat), tokenizer, cfg.data.seq_len,
                                    val_fraction=cfg.data.val_fraction, seed=cfg.run.seed)
    pad = student_cfg.pad_token_id if student_cfg.pad_token_id is not None else student_cfg.eos_ids[0]
    sources = [ChatBatches(part, cfg.run.seed, pad, cfg.data.seq_len, cfg.data.pack) for part in (train, val)]
    return RunParts(student, *sources, len(val), decoder_saver(cfg, student_cfg, tokenizer),
                    objective=DistillationLoss(student, teacher, section.temperature, section.alpha),
                    frozen=[teacher])


register_task("draft_distill", build_draft, section=DraftDistillSection, key="draft_distill",
              summary="a draft model from a teacher's layers, distilled on its token distributions")


def distill_draft(cfg: EFTConfig, train_file: Path, out: Path) -> Path:
    steps, section = cfg.draft.steps, cfg.draft
    raw = {
        "task": "draft_distill", "out_dir": str((out / "draft").resolve()),
        "draft_distill": {"teacher": section.teacher, "layers": section.layers, "temperature": section.temperature,
                          "alpha": section.alpha},
        "data": {"chat": str(train_file.resolve()), "seq_len": cfg.finetune.seq_len, "val_fraction": 0.05},
        "optim": {"lr": section.lr, "min_lr": section.lr / 10, "warmup_steps": max(1, steps // 20),
                  "weight_decay": 0.0, "schedule": "cosine"},
        "run": {**_run_section(cfg, steps), "micro_batch_size": section.micro_batch_size},
    }
    return _train(raw, f"distil the draft from {section.teacher} (layers {section.layers}, {steps} steps)")


# ------------------------------------------------------------------------------------------------ evaluation
def up_arm(beta: float) -> str:
    return f"EFT up-scaled (beta {beta:g})"


DOWN = "EFT down-scaled"


def arm_recipes(betas: list[float]) -> dict[str, tuple[str, list[tuple[float, str, str]]]]:
    """Each arm as (base, [(weight, tuned, reference)]) over the four models' names."""
    arms = {"small base": ("small_base", []), "small ft": ("small_ft", []), "large base": ("large_base", []),
            "large ft": ("large_ft", [])}
    for beta in betas:
        arms[up_arm(beta)] = ("large_base", [(float(beta), "small_ft", "small_base")])
    arms[DOWN] = ("small_base", [(1.0, "large_ft", "large_base")])
    return arms


def heldout_conversations(path: Path, tokenizer, max_len: int) -> list[dict]:
    """Held-out conversations tokenized with assistant labels, plus the prompt (all but the last assistant
    turn) and the reference answer."""
    from ..train.chat_data import load_conversations, tokenize_conversation
    from ..train.losses import IGNORE

    items = []
    for messages in load_conversations(path):
        if messages[-1]["role"] != "assistant":
            continue
        example = tokenize_conversation(tokenizer, messages, max_len)
        if all(label == IGNORE for label in example["labels"]):
            continue
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True),
                                  add_special_tokens=False)
        items.append({**example, "prompt": prompt, "reference": messages[-1]["content"]})
    if not items:
        raise SlmError(f"{path}: no held-out conversation ends in an assistant turn")
    return items


@torch.no_grad()
def assistant_loglik(models: dict, arms: dict, items: list[dict]) -> dict[str, dict]:
    """Per arm: mean negative log-likelihood per assistant token (and perplexity) over ``items``, each
    arm's distribution renormalised per token."""
    from ..engine.combine import combine
    from ..train.losses import IGNORE

    totals = {name: 0.0 for name in arms}
    count = 0
    for item in items:
        ids = torch.tensor([item["input_ids"]])
        labels = torch.tensor(item["labels"])
        where = (labels != IGNORE).nonzero().flatten()
        where = where[where > 0]
        targets = labels[where]
        logp = {name: torch.log_softmax(m(ids)[0, where - 1].float(), dim=-1) for name, m in models.items()}
        for name, (base, deltas) in arms.items():
            scores = combine(logp[base], [(w, logp[t], logp[r]) for w, t, r in deltas])
            totals[name] -= float(scores.gather(1, targets[:, None]).sum())
        count += len(targets)
    return {name: {"nll": total / count, "ppl": float(torch.exp(torch.tensor(total / count))), "tokens": count}
            for name, total in totals.items()}


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words (Lin 2004, beta = 1)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def answer_quality(models: dict, arms: dict, items: list[dict], cfg: EFTConfig, eos_ids: set[int], tokenizer,
                   out: Path) -> dict[str, dict]:
    """Greedy answers of each arm to the first ``eval.answers`` held-out prompts: ROUGE-L F1 against the
    reference and the rate of answers that end their turn within ``eval.max_new_tokens``."""
    from tqdm import tqdm

    from ..engine.combine import Delta, generate_combined
    from ..engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    chosen = items[:cfg.eval.answers]
    results, samples = {}, []
    for name, (base, deltas) in tqdm(list(arms.items()), desc="eft answers", unit="arm"):
        scores, stops = [], 0
        for k, item in enumerate(chosen):
            got = generate_combined(models[base], [Delta(models[t], models[r], w) for w, t, r in deltas],
                                    item["prompt"], params, eos_ids=eos_ids, tokenizer=tokenizer)
            scores.append(rouge_l(got.text, item["reference"]))
            stops += got.finish_reason == "stop"
            if k < 3:
                samples.append({"arm": name, "item": k, "answer": got.text})
        results[name] = {"rouge_l": sum(scores) / len(scores), "ends_turn": stops / len(chosen),
                         "answers": len(chosen)}
    write_atomically(out / "answer_samples.json", json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    return results


def recovered(loglik: dict[str, dict], arm: str) -> float | None:
    """The share of the fine-tuning gain an EFT arm emulates, in assistant NLL: (base - arm) / (base - ft) for
    the model it stands in for -- the large one when up-scaling, the small one when down-scaling."""
    scale = "small" if arm == DOWN else "large"
    base, tuned = loglik[f"{scale} base"]["nll"], loglik[f"{scale} ft"]["nll"]
    return None if base == tuned else (base - loglik[arm]["nll"]) / (base - tuned)


# ------------------------------------------------------------------------------------------------ speculative
def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def speculative_runs(target, draft, prompts: list[list[int]], plain_decode, gammas: list[int], max_new: int,
                     eos_ids: set[int], label: str) -> dict:
    """Plain decoding of ``target`` against speculative decoding with ``draft`` at each gamma (greedy): wall
    time, tokens/s, acceptance, tokens per target pass and whether every output equals plain decoding's."""
    from tqdm import tqdm

    from ..engine.sampling import SamplingParams
    from ..engine.speculative import speculative_generate

    params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    plain_decode(prompts[0][:8], params)  # warm-up: kernels, fused layers, allocator
    plain, seconds = [], 0.0
    for prompt in tqdm(prompts, desc=f"{label}: plain", unit="prompt"):
        ids, dt = _timed(lambda: plain_decode(prompt, params))
        plain.append(ids)
        seconds += dt
    tokens = sum(len(p) for p in plain)
    result = {"prompts": len(prompts), "tokens": tokens, "plain_seconds": round(seconds, 2),
              "plain_tokens_per_s": tokens / seconds, "gammas": {}}
    for gamma in gammas:
        same, drafted, accepted, rounds, spec_seconds, spec_tokens = 0, 0, 0, 0, 0.0, 0
        for prompt, want in tqdm(list(zip(prompts, plain)), desc=f"{label}: gamma {gamma}", unit="prompt"):
            (got, stats), dt = _timed(lambda: speculative_generate(target, draft, prompt, params, gamma=gamma,
                                                                   eos_ids=eos_ids))
            same += got.token_ids == want
            drafted, accepted, rounds = drafted + stats.drafted, accepted + stats.accepted, rounds + stats.rounds
            spec_seconds += dt
            spec_tokens += len(got.token_ids)
        result["gammas"][str(gamma)] = {
            "identical_outputs": same, "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_target_pass": (accepted + rounds) / rounds if rounds else 0.0,
            "seconds": round(spec_seconds, 2), "tokens_per_s": spec_tokens / spec_seconds,
            "speedup": seconds / spec_seconds}
    return result


def eft_speculative(models: dict, items: list[dict], cfg: EFTConfig, eos_ids: set[int]) -> dict:
    """The EFT up-scaled target (beta 1) drafted by the small fine-tuned model."""
    from ..engine.combine import Delta, Ensemble, generate_combined

    target = Ensemble(models["large_base"], [Delta(models["small_ft"], models["small_base"], 1.0)])

    def plain(prompt, params):
        return generate_combined(target.base, target.deltas, prompt, params, eos_ids=eos_ids).token_ids

    prompts = [item["prompt"] for item in items[:cfg.speculative.prompts]]
    return speculative_runs(target, models["small_ft"], prompts, plain, cfg.speculative.gammas,
                            cfg.speculative.max_new_tokens, eos_ids, "EFT speculative")


def draft_speculative(cfg: EFTConfig, draft_dir: Path, items: list[dict]) -> dict:
    """SmolLM2 (the file's own int4) drafted by the distilled draft (in ``draft.quant``)."""
    from ..api import load
    from ..engine.generate import generate
    from ..engine.sampling import SamplingParams

    target_lm, draft_lm = load(cfg.draft.teacher), load(str(draft_dir), quant=cfg.draft.quant)
    target = target_lm.model
    eos_ids = set(target.cfg.eos_ids)

    def plain(prompt, params):
        return generate(target, None, [prompt], params, eos_ids=eos_ids)[0].token_ids

    # the family's tokenizer is SmolLM2's: the held-out prompts are already in its chat template
    prompts = [item["prompt"] for item in items[:cfg.speculative.prompts]]
    result = speculative_runs(target, draft_lm.model, prompts, plain, cfg.speculative.gammas,
                              cfg.speculative.max_new_tokens, eos_ids, "SmolLM2 speculative")
    params = SamplingParams(max_new_tokens=cfg.speculative.max_new_tokens, temperature=0.0)
    ids, dt = _timed(lambda: [generate(draft_lm.model, None, [p], params, eos_ids=eos_ids)[0].token_ids
                              for p in prompts])
    result["draft_tokens_per_s"] = sum(len(i) for i in ids) / dt
    result["draft_quant"], result["target_quant"] = draft_lm.model.quant, target.quant
    return result



# ------------------------------------------------------------------------------------------------ the run
def run(cfg: EFTConfig) -> dict:
    """Train the family and the draft (each reused when already trained), evaluate every arm, run the
    speculative comparisons; writes ``results.json`` and ``results.md`` in ``out_dir``."""
    from ..api import load
    from ..tokenizer import Tokenizer

    check_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer_dir = family_tokenizer(cfg, out)
    tokenizer = Tokenizer.from_hf_dir(tokenizer_dir)
    train_file, heldout_file = split_instructions(cfg, out)
    items = heldout_conversations(heldout_file, tokenizer, cfg.finetune.seq_len)  # a bad file fails before training
    paths = {}
    for name in ("small", "large"):
        paths[f"{name}_base"] = pretrain_base(cfg, name, tokenizer_dir, out)
        paths[f"{name}_ft"] = finetune(cfg, name, paths[f"{name}_base"], train_file, out)
    draft_dir = distill_draft(cfg, train_file, out)
    models = {name: load(str(path), quant="none").model.eval() for name, path in paths.items()}
    eos_ids = set(models["large_ft"].cfg.eos_ids)
    arms = arm_recipes(cfg.eval.betas)
    print("eft: assistant-token log-likelihood of every arm", file=sys.stderr)
    loglik = assistant_loglik(models, arms, items)
    answered = ["small ft", "large base", "large ft", up_arm(1.0 if 1.0 in cfg.eval.betas else cfg.eval.betas[0]), DOWN]
    answer_arms = {name: arms[name] for name in answered}
    quality = answer_quality(models, answer_arms, items, cfg, eos_ids, tokenizer, out)
    report = {"config": dataclasses.asdict(cfg), "heldout_conversations": len(items),
              "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
              "loglik": loglik, "recovered": {arm: recovered(loglik, arm) for arm in arms if arm.startswith("EFT")},
              "answers": quality}
    _report(out, report, started)
    if cfg.speculative.prompts:
        report["eft_speculative"] = eft_speculative(models, items, cfg, eos_ids)
        _report(out, report, started)
        report["smollm2_speculative"] = draft_speculative(cfg, draft_dir, items)
    report["complete"] = True
    _report(out, report, started)
    return report


def _report(out: Path, report: dict, started: float) -> None:
    report["wall_seconds"] = round(time.time() - started, 1)
    write_atomically(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "results.md", tables(report))


def tables(report: dict) -> str:
    params = report["parameters"]
    lines = [f"Held-out conversations: {report['heldout_conversations']} "
             f"({next(iter(report['loglik'].values()))['tokens']} assistant tokens). Parameters: "
             + ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.1f}M" for k, v in params.items()) + ".", "",
             "| arm | assistant NLL / token | perplexity | share of the fine-tuning gain emulated | ROUGE-L F1 | ends its turn |",
             "|---|---|---|---|---|---|"]
    for arm, ll in report["loglik"].items():
        share = report["recovered"].get(arm)
        share = "" if share is None else f"{100 * share:.0f} %"
        quality = report["answers"].get(arm)
        rouge = "" if quality is None else f"{100 * quality['rouge_l']:.1f}"
        ends = "" if quality is None else f"{100 * quality['ends_turn']:.0f} %"
        lines.append(f"| {arm} | {ll['nll']:.3f} | {ll['ppl']:.1f} | {share} | {rouge} | {ends} |")
    for key, title in (("eft_speculative", "EFT up-scaled target (beta 1), small ft drafting"),
                       ("smollm2_speculative", "SmolLM2-135M-Instruct target, distilled draft")):
        spec = report.get(key)
        if not spec:
            continue
        lines += ["", f"{title}: {spec['prompts']} prompts, {spec['tokens']} tokens, plain decoding "
                      f"{spec['plain_tokens_per_s']:.1f} tokens/s"
                  + (f", the draft alone {spec['draft_tokens_per_s']:.1f} tokens/s" if "draft_tokens_per_s" in spec else "")
                  + ".", "",
                  "| gamma | identical greedy outputs | acceptance rate | tokens per target pass | tokens/s | speed-up |",
                  "|---|---|---|---|---|---|"]
        for gamma, g in spec["gammas"].items():
            lines.append(f"| {gamma} | {g['identical_outputs']} / {spec['prompts']} | {100 * g['acceptance_rate']:.1f} % | "
                         f"{g['tokens_per_target_pass']:.2f} | {g['tokens_per_s']:.1f} | {g['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"
