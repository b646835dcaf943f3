"""Plot a run's loss curves from its metrics.csv to a PNG (matplotlib, Agg, no display needed).

Training loss is drawn as a thin line with a smoothed line over it (a debiased exponential moving
average, as TensorBoard's smoothing slider computes it); validation loss as markers. The x axis is
tokens seen (in thousands, millions or billions when large), or steps when the file has no token counts.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from ..errors import SlmError
from .metrics import read_metrics


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average: s_i = sum_j w^(i-j) (1-w) v_j / (1 - w^(i+1))."""
    if not 0.0 <= weight < 1.0:
        raise SlmError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc = [], 0.0
    for i, value in enumerate(values):
        acc = weight * acc + (1.0 - weight) * value
        out.append(acc / (1.0 - weight ** (i + 1)))
    return out


def auto_smoothing(n: int) -> float:
    """A smoothing weight averaging over about 2 % of the points (none for short runs)."""
    span = n / 50
    return 0.0 if span <= 1 else 1.0 - 1.0 / span


def plot_losses(
    csv_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    title: str = "",
    *,
    log_y: bool = False,
    smoothing: float | None = None,
) -> Path:
    """Draw train/validation loss against tokens from ``csv_path`` into ``png_path``; returns ``png_path``.

    ``smoothing`` is the EMA weight for the smoothed training line (``None``: chosen from the number of
    points). The PNG is written to a temporary file next to ``png_path`` and moved into place.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    csv_path, png_path = Path(csv_path), Path(png_path)
    rows = read_metrics(csv_path)
    train = [r for r in rows if r["loss"] is not None and math.isfinite(r["loss"])]
    val = [r for r in rows if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    if not train and not val:
        raise SlmError(f"{csv_path} has no loss values to plot")

    use_tokens = all(r["tokens"] is not None for r in train + val)
    largest = max(r["tokens"] if use_tokens else r["step"] for r in train + val)
    scale, unit = next(((s, u) for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if largest >= s), (1, ""))

    def x(row):
        return (row["tokens"] if use_tokens else row["step"]) / scale

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        xs, losses = [x(r) for r in train], [r["loss"] for r in train]
        weight = auto_smoothing(len(losses)) if smoothing is None else smoothing
        ax.plot(xs, losses, color="tab:blue", linewidth=0.7, alpha=0.35 if weight > 0 else 1.0, label="train loss")
        if weight > 0:
            ax.plot(xs, ema(losses, weight), color="tab:blue", linewidth=1.8, label=f"train loss (EMA {weight:.3g})")
    if val:
        ax.plot([x(r) for r in val], [r["val_loss"] for r in val], "o", color="tab:orange", markersize=5,
                label="validation loss")
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 3, 4, 6, 10 rather than 3x10^0 ...
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    what = "tokens" if use_tokens else "step"
    ax.set_xlabel(f"{what} ({unit})" if unit else what)
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()

    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, png_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return png_path
