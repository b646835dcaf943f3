"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state.

- cosine: linear warmup to ``lr``, then a half cosine down to ``min_lr`` at the last step (TinyLlama).
- wsd (warmup-stable-decay, MiniCPM): warmup, a constant ``lr``, then the last ``decay_fraction`` of the
  steps decays linearly to ``min_lr`` — a run can be extended from any stable-phase checkpoint.
- constant: warmup, then ``lr``.
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, *, lr: float, min_lr: float, warmup_steps: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(total_steps * decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
