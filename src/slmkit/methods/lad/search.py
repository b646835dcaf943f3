"""Evolutionary search for length configurations on the accuracy / token-budget frontier (after the
Length-Adaptive Transformer's ``evolution.py``).

The population starts from constant schedules and LAT-sampled ones; each iteration takes the current Pareto
front (highest accuracy for its budget) as parents and adds ``mutations`` children (one layer's ratio
resampled between its neighbours) and ``crossovers`` children (the rounded mean of two parents). Every
configuration is evaluated once (a cache), on the search split only; the test split is touched afterwards.
"""

from __future__ import annotations

import random
from typing import Callable

from .objectives import sample_ratios
from .pruning import token_budget

STEP = 0.05  # ratios are searched on a grid of 5 % of the tokens


def _snap(ratios: list[float]) -> tuple[float, ...]:
    out, previous = [], 1.0
    for r in ratios:
        r = min(previous, max(STEP, round(r / STEP) * STEP))
        out.append(round(r, 4))
        previous = r
    return tuple(out)


def pareto_front(points: dict[tuple[float, ...], float]) -> list[tuple[float, ...]]:
    """Configurations no other beats on both accuracy (higher) and token budget (lower)."""
    front = []
    for config, acc in points.items():
        budget = token_budget(config)
        if not any(a >= acc and token_budget(c) <= budget and (a > acc or token_budget(c) < budget)
                   for c, a in points.items()):
            front.append(config)
    return sorted(front, key=token_budget)


def evolutionary_search(evaluate: Callable[[tuple[float, ...]], float], n_layers: int, iterations: int = 6,
                        mutations: int = 12, crossovers: int = 6, seed: int = 0,
                        on_progress: Callable[[int, int], None] | None = None) -> dict[tuple[float, ...], float]:
    """Every configuration evaluated (ratios -> accuracy on the search split)."""
    rng = random.Random(seed)
    points: dict[tuple[float, ...], float] = {}

    def add(config) -> None:
        config = _snap(list(config))
        if config not in points:
            points[config] = evaluate(config)

    for r in (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2):
        add([r] * n_layers)
    for _ in range(mutations):
        add(sample_ratios(n_layers, rng.choice([0.2, 0.4, 0.6, 0.8]), rng))
    for it in range(iterations):
        parents = pareto_front(points)
        for _ in range(mutations):
            child = list(rng.choice(parents))
            i = rng.randrange(n_layers)
            high = child[i - 1] if i > 0 else 1.0
            low = child[i + 1] if i + 1 < n_layers else STEP
            child[i] = rng.uniform(low, high)
            add(child)
        for _ in range(crossovers):
            a, b = rng.choice(parents), rng.choice(parents)
            add([(x + y) / 2 for x, y in zip(a, b)])
        if on_progress is not None:
            on_progress(it + 1, len(points))
    return points


def best_within(points: dict[tuple[float, ...], float], budget: float) -> tuple[float, ...] | None:
    """The most accurate configuration spending at most ``budget`` of the tokens (ties: the cheaper)."""
    fitting = [(acc, -token_budget(c), c) for c, acc in points.items() if token_budget(c) <= budget + 1e-9]
    return max(fitting)[2] if fitting else None


__all__ = ["pareto_front", "evolutionary_search", "best_within"]
