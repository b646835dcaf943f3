"""Metrics computed from per-sample records, with standard errors.

Each metric is a function of the list of sample records a task writes, so the figure in a report can
always be recomputed from the JSON output. Means get the sample standard error
(sample std / sqrt(n)); corpus-level figures (perplexities, macro-F1) a seeded bootstrap over samples.
"""

from __future__ import annotations

import math
import re

import numpy as np

BOOTSTRAP_ITERS = 1000
BOOTSTRAP_SEED = 1234


def mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def macro_f1(golds: list[int], preds: list[int]) -> float:
    """F1 averaged over the classes that occur among the golds or the predictions (sklearn's 'macro')."""
    labels = sorted(set(golds) | set(preds))
    scores = []
    for c in labels:
        tp = sum(1 for g, p in zip(golds, preds) if g == c and p == c)
        fp = sum(1 for g, p in zip(golds, preds) if g != c and p == c)
        fn = sum(1 for g, p in zip(golds, preds) if g == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(sum(scores) / len(scores)) if scores else float("nan")


def perplexity(logprob_sum: float, count: float) -> float:
    return math.exp(-logprob_sum / count)


# ----------------------------------------------------------- aggregation
def _per_sample(kind: str, metric: str) -> bool:
    """Metrics that are the mean of a value stored in each sample record."""
    return kind != "loglikelihood" and (metric in ("acc", "acc_norm") or metric.startswith("exact_match"))


def aggregate(kind: str, metric: str, samples: list[dict]) -> float:
    """The task-level value of ``metric`` from the sample records."""
    if _per_sample(kind, metric):
        return mean([s[metric] for s in samples])
    if kind == "loglikelihood":
        if metric == "acc":
            return mean([float(s["greedy"]) for s in samples])
        return math.exp(-mean([s["logprob"] for s in samples]))  # exp of the mean negative log-likelihood
    if metric == "macro_f1":
        return macro_f1([s["gold"] for s in samples], [s["pred"] for s in samples])
    total = sum(s["logprob"] for s in samples)
    if metric == "word_perplexity":
        return perplexity(total, sum(s["words"] for s in samples))
    if metric == "token_perplexity":
        return perplexity(total, sum(s["tokens"] for s in samples))
    if metric == "byte_perplexity":
        return perplexity(total, sum(s["bytes"] for s in samples))
    if metric == "bits_per_byte":
        return -total / sum(s["bytes"] for s in samples) / math.log(2)
    raise ValueError(f"no aggregation for {metric} on a {kind} task")


def stderr(kind: str, metric: str, samples: list[dict]) -> float:
    if _per_sample(kind, metric):
        return mean_stderr([s[metric] for s in samples])
    if kind == "loglikelihood" and metric == "acc":
        return mean_stderr([float(s["greedy"]) for s in samples])
    n = len(samples)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    values = [aggregate(kind, metric, [samples[i] for i in rng.integers(0, n, n)]) for _ in range(BOOTSTRAP_ITERS)]
    return float(np.std(values, ddof=1))


# ----------------------------------------------------- answer extraction
def extract(text: str, regex: str, group_select: int, fallback: str) -> str:
    """The ``group_select``-th match of ``regex`` in ``text``; for a regex with groups, its first non-empty
    group (lm-evaluation-harness's regex filter)."""
    matches = re.findall(regex, text)
    if not matches:
        return fallback
    try:
        match = matches[group_select]
    except IndexError:
        return fallback
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def normalize_answer(text: str, ignore_case: bool, regexes_to_ignore: list[str]) -> str:
    for rx in regexes_to_ignore:
        text = re.sub(rx, "", text)
    return text.lower() if ignore_case else text


# --------------------------------------------------------- word counting
def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization (``@-@``, spaces before punctuation, spaced quotes and brackets)."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,:;!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)
    text = re.sub(r"(\n ?)= = = (.*?) = = =", r"\1=== \2 ===", text)
    text = re.sub(r"(\n ?)= = (.*?) = =", r"\1== \2 ==", text)
    return text


DETOKENIZERS = {"wikitext": detokenize_wikitext}
