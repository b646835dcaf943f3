"""Run tasks on a model: build the prompts (with seeded few-shot examples), score, write sample records.

Requests are built the way lm-evaluation-harness builds them, so figures are comparable: the context is
``description + shots + prompt``, a continuation is ``target_delimiter + choice``, whitespace at the end
of a context moves to the front of the continuation, and a continuation's tokens are those of
``encode(context + continuation)`` after the context's tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..api.encoder import EncoderLM
from ..engine.generate import generate
from ..engine.sampling import SamplingParams
from ..errors import SlmError
from . import metrics as M
from .data import read_records
from .scoring import Group, rolling_windows, score_groups
from .task import Task, TaskError


class Evaluator:
    """Scores tasks on one loaded model (an ``slmkit.LM``)."""

    def __init__(self, lm, *, batch_size: int = 16, max_length: int | None = None, seed: int = 1234,
                 data_dir: str | Path | None = None, add_bos: bool | None = None, progress: bool = True,
                 prefix_lm: bool = False, lead: str | None = None):
        if batch_size < 1:
            raise SlmError(f"batch size must be >= 1, got {batch_size}")
        self.lm, self.tok = lm, lm.tokenizer
        self.batch_size, self.seed, self.data_dir, self.progress = batch_size, seed, data_dir, progress
        self.max_length = max_length or lm.config.max_position_embeddings
        if self.max_length < 2:
            raise SlmError(f"max length must be >= 2, got {self.max_length}")
        # lm-evaluation-harness adds no BOS unless the tokenizer itself adds one (Gemma)
        self.add_bos = self.tok.add_bos if add_bos is None else add_bos
        bos, eos = self.tok.bos_id, self.tok.eos_id
        self.prefix_token = bos if bos is not None else eos  # context of an empty prompt
        self.pad_id = self.tok.pad_id if self.tok.pad_id is not None else (eos or 0)
        # a prefix LM (UL2R) reads each context in both directions, after a mode token such as [S2S]
        self.prefix_lm = prefix_lm
        self.lead_ids: list[int] = []
        if lead:
            index = self.tok.token_to_id(lead)
            if index is None:
                raise SlmError(f"lead token {lead!r} is not in the model's vocabulary")
            self.lead_ids = [index]

    # -------------------------------------------------------------- tokens
    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.tok.bos_id] + ids if self.add_bos and self.tok.bos_id is not None else ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token], self.tok.encode(continuation, add_special_tokens=False)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------ few-shot
    def fewshot_prefix(self, task: Task, doc: dict, index: int, pool: list[dict], same_pool: bool,
                       k: int) -> str:
        shots = []
        if k:
            eligible = range(len(pool))
            if task.fewshot_group_by:
                key = task.fewshot_group_by
                eligible = [i for i in eligible if pool[i].get(key) == doc.get(key)]
            if task.fewshot_sampler == "first_n":
                candidates = list(eligible)[:k + 1]
            else:
                rng = random.Random(self.seed * 1_000_003 + index)
                candidates = rng.sample(list(eligible), min(len(eligible), k + 1))
            chosen = [i for i in candidates if not (same_pool and i == index)][:k]
            if len(chosen) < k:
                raise TaskError(f"task {task.name}: {k} few-shot examples asked for, the pool has {len(chosen)}")
            for i in chosen:
                shots.append(task.fewshot_question(pool[i]) + task.target_delimiter + task.fewshot_answer(pool[i]))
        text = task.description_text(doc)
        if shots:
            text += task.fewshot_delimiter.join(shots) + task.fewshot_delimiter
        return text

    # ---------------------------------------------------------------- tasks
    def run(self, task: Task, limit: int | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
        docs = read_records(**_spec(task.data), data_dir=self.data_dir)
        if limit is not None:
            if limit < 1:
                raise SlmError(f"limit must be >= 1, got {limit}")
            docs_eval = docs[:limit]
        else:
            docs_eval = docs
        k = task.num_fewshot if num_fewshot is None else num_fewshot
        if k < 0:
            raise SlmError(f"num_fewshot must be >= 0, got {k}")
        if task.kind == "perplexity" and k:
            raise TaskError(f"task {task.name}: few-shot examples do not apply to a perplexity task")
        if isinstance(self.lm, EncoderLM):
            if task.kind != "classification" or k:
                raise TaskError(f"task {task.name}: an encoder is scored by its classification head, on "
                                f"classification tasks without few-shot examples (got {task.kind}, {k}-shot)")
            return self._result(task, self._head(task, docs_eval), k)
        same_pool = task.fewshot_data is None
        pool = docs if same_pool else read_records(**_spec(task.fewshot_data), data_dir=self.data_dir)
        prefixes = [] if task.kind == "perplexity" else \
            [self.fewshot_prefix(task, d, i, pool, same_pool, k) for i, d in enumerate(docs_eval)]
        runner = {"multiple_choice": self._choices, "classification": self._choices,
                  "generate": self._generate, "loglikelihood": self._loglikelihood,
                  "perplexity": self._perplexity}[task.kind]
        return self._result(task, runner(task, docs_eval, prefixes), k)

    def _result(self, task: Task, samples: list[dict], k: int) -> dict[str, Any]:
        result: dict[str, Any] = {"kind": task.kind, "n": len(samples), "num_fewshot": k}
        for metric in self.metric_names(task):
            result[metric] = M.aggregate(task.kind, metric, samples)
            result[f"{metric}_stderr"] = M.stderr(task.kind, metric, samples)
        return {"result": result, "samples": samples}

    @staticmethod
    def metric_names(task: Task) -> list[str]:
        if task.kind == "generate" and task.extract:
            return [f"exact_match_{e.name}" for e in task.extract]
        return list(task.metrics)

    def _desc(self, task: Task) -> str | None:
        return task.name if self.progress else None

    def _choices(self, task: Task, docs: list[dict], prefixes: list[str]) -> list[dict]:
        groups, meta = [], []
        for i, (doc, prefix) in enumerate(zip(docs, prefixes)):
            choices = task.choice_list(doc)
            gold = task.target_index(doc, len(choices))
            if task.contexts is not None:  # partial scoring: each option is a context, one shared continuation
                cont = task.target_delimiter + task.continuation_text(doc)
                pairs = [self.encode_pair(prefix + option, cont) for option in choices]
                groups.extend(Group(c, [x]) for c, x in pairs)
                meta.append((i, choices, gold, len(pairs)))
                continue
            context = prefix + task.prompt_text(doc)
            pairs = [self.encode_pair(context, task.target_delimiter + c) for c in choices]
            groups.append(Group(pairs[0][0], [x for _, x in pairs]))  # one context, every choice after it
            meta.append((i, choices, gold, 1))
        scores = self._score_contexts(groups, task)
        samples, at = [], 0
        for i, choices, gold, n_groups in meta:
            flat = [s for g in scores[at:at + n_groups] for s in g]
            at += n_groups
            logprobs = [s.logprob for s in flat]
            lengths = [len(c) for c in choices]
            pred = max(range(len(choices)), key=lambda j: logprobs[j])
            pred_norm = max(range(len(choices)), key=lambda j: logprobs[j] / lengths[j])
            samples.append({
                "index": i, "prompt": task.prompt_text(docs[i]) if task.contexts is None else None,
                "choices": choices, "gold": gold, "logprobs": logprobs, "choice_chars": lengths,
                "pred": pred, "pred_norm": pred_norm,
                "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
            })
        return samples

    def _score_contexts(self, groups: list[Group], task: Task):
        groups = [Group(self.lead_ids + g.context, g.continuations) for g in groups] if self.lead_ids else groups
        return score_groups(self.lm.model, groups, self.batch_size, self.max_length, self.pad_id, self._desc(task),
                            bidirectional_context=self.prefix_lm)

    def _head(self, task: Task, docs: list[dict]) -> list[dict]:
        """An encoder's classification head: logit j scores choice j (a label's index is its choice's)."""
        texts = [task.classifier_text(d) for d in docs]
        logits = self.lm.classify(texts, batch_size=self.batch_size).tolist()
        samples = []
        for i, (doc, text, row) in enumerate(zip(docs, texts, logits)):
            choices = task.choice_list(doc)
            if len(choices) != len(row):
                raise TaskError(f"task {task.name}: {len(choices)} choices, the model's head has {len(row)} labels")
            gold, pred = task.target_index(doc, len(choices)), max(range(len(row)), key=row.__getitem__)
            samples.append({"index": i, "prompt": text, "choices": choices, "gold": gold, "logits": row,
                            "pred": pred, "pred_norm": pred, "acc": float(pred == gold),
                            "acc_norm": float(pred == gold)})
        return samples

    def _loglikelihood(self, task: Task, docs: list[dict], prefixes: list[str]) -> list[dict]:
        groups, targets = [], []
        for doc, prefix in zip(docs, prefixes):
            target = task.target_text(doc)
            ctx, cont = self.encode_pair(prefix + task.prompt_text(doc), target)
            groups.append(Group(ctx, [cont]))
            targets.append(target)
        scores = self._score_contexts(groups, task)
        return [{"index": i, "target": targets[i], "logprob": s[0].logprob, "greedy": s[0].greedy,
                 "tokens": s[0].tokens} for i, s in enumerate(scores)]

    def _perplexity(self, task: Task, docs: list[dict], prefixes: list[str]) -> list[dict]:
        clean = M.DETOKENIZERS.get(task.detokenize) if task.detokenize else None
        if task.detokenize and clean is None:
            raise TaskError(f"task {task.name}: unknown detokenize {task.detokenize!r} "
                            f"(choose from {', '.join(M.DETOKENIZERS)})")
        texts = [task.document_text(d) for d in docs]
        texts = [clean(t) if clean else t for t in texts]
        groups, owner = [], []
        for i, text in enumerate(texts):
            tokens = self.tok.encode(text, add_special_tokens=False)
            if not tokens:
                raise TaskError(f"task {task.name}: document {i} is empty")
            windows = rolling_windows(tokens, self.prefix_token, self.max_length)
            groups.extend(windows)
            owner.extend([i] * len(windows))
        scores = score_groups(self.lm.model, groups, self.batch_size, self.max_length, self.pad_id,
                              self._desc(task))
        samples = [{"index": i, "logprob": 0.0, "tokens": 0, "words": M.count_words(t),
                    "bytes": len(t.encode("utf-8"))} for i, t in enumerate(texts)]
        for i, s in zip(owner, scores):
            samples[i]["logprob"] += s[0].logprob
            samples[i]["tokens"] += s[0].tokens
        return samples

    def _generate(self, task: Task, docs: list[dict], prefixes: list[str]) -> list[dict]:
        params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0.0, stop=list(task.until))
        budget = self.max_length - task.max_new_tokens
        if budget < 1:
            raise TaskError(f"task {task.name}: max_new_tokens {task.max_new_tokens} leaves no room for a "
                            f"prompt in a context of {self.max_length}")
        prompts = [self.encode(p + task.prompt_text(d))[-budget:] for d, p in zip(docs, prefixes)]
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        texts: list[str] = [""] * len(prompts)
        bar = tqdm(total=len(prompts), desc=self._desc(task), unit="item", disable=not self.progress, leave=False)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            done = generate(self.lm.model, self.tok, [prompts[i] for i in batch], params, self.lm.eos_ids)
            for i, completion in zip(batch, done):
                texts[i] = completion.text
            bar.update(len(batch))
        bar.close()
        samples = []
        for i, (doc, text) in enumerate(zip(docs, texts)):
            reference = M.normalize_answer(task.answer_text(doc), task.ignore_case, task.regexes_to_ignore)
            record = {"index": i, "prompt": task.prompt_text(doc), "generation": text, "reference": reference}
            extractions = task.extract or []
            for e in extractions:
                got = M.extract(text, e.regex, e.group_select, e.fallback)
                got = M.normalize_answer(got, task.ignore_case, task.regexes_to_ignore)
                record[f"extracted_{e.name}"] = got
                record[f"exact_match_{e.name}"] = float(got == reference)
            if not extractions:
                got = M.normalize_answer(text.strip(), task.ignore_case, task.regexes_to_ignore)
                record["exact_match"] = float(got == reference)
            samples.append(record)
        return samples


def _spec(data) -> dict:
    return {"path": data.path, "fmt": data.format, "encoding": data.encoding, "pattern": data.pattern,
            "separator": data.separator}
