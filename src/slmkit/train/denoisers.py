"""UL2's mixture of denoisers (Tay et al. 2023) as data transforms for a decoder-only model.

Every denoiser turns a window of tokens into ``mode token + prefix`` (read bidirectionally) followed by a
target (read causally, the only tokens with a loss):

* R and X (span corruption, T5 style): spans of mean length ``mean_span`` covering ``rate`` of the window
  become sentinels ``<extra_id_i>`` in the prefix; the target is each sentinel followed by the span it hid,
  then EOS. R is regular (``[NLU]``), X extreme (long spans or a high rate, ``[NLG]``).
* S (prefix LM, ``[S2S]``): the window is split at a random point (T5's ``random_prefix_noise_mask``: the
  suffix is 1 .. 2 * rate of the window, so ``rate`` on average); the target is the suffix.

``UPALM`` is U-PaLM's simplified mixture (50 % S, 25 % regular, 25 % extreme), UL2R's default; ``UL2`` is
UL2's seven denoisers with equal weight. The noise masks are ``seq2seq_tasks.random_spans_noise_mask``, the
same function T5 span corruption uses here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SlmError
from .losses import IGNORE
from .seq2seq_tasks import corrupt, corrupted_lengths, random_spans_noise_mask

MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@dataclass(frozen=True)
class Denoiser:
    kind: str  # R | X | S
    mean_span: float  # R / X: mean span length (S: unused)
    rate: float  # fraction of the window corrupted (S: mean fraction of the window in the target)
    weight: float  # share of the mixture

    @property
    def mode(self) -> str:
        return MODE_TOKENS[self.kind]

    @property
    def name(self) -> str:
        return f"S(r={self.rate})" if self.kind == "S" else f"{self.kind}(mu={self.mean_span:g}, r={self.rate})"


UPALM = (Denoiser("S", 0.0, 0.25, 0.50), Denoiser("R", 3, 0.15, 0.25),
         Denoiser("X", 32, 0.15, 0.125), Denoiser("X", 3, 0.5, 0.125))
UL2 = (Denoiser("R", 3, 0.15, 1 / 7), Denoiser("R", 8, 0.15, 1 / 7), Denoiser("X", 3, 0.5, 1 / 7),
       Denoiser("X", 8, 0.5, 1 / 7), Denoiser("X", 64, 0.15, 1 / 7), Denoiser("X", 64, 0.5, 1 / 7),
       Denoiser("S", 0.0, 0.25, 1 / 7))
MIXTURES = {"upalm": UPALM, "ul2": UL2}


def mixture(name: str, weights: list[float] | None = None) -> tuple[Denoiser, ...]:
    """A named mixture, its weights optionally replaced (in the mixture's order) and renormalised."""
    if name not in MIXTURES:
        raise SlmError(f"ul2r.mixture: unknown mixture {name!r} (known: {', '.join(MIXTURES)})")
    chosen = MIXTURES[name]
    if weights:
        if len(weights) != len(chosen) or min(weights) < 0 or sum(weights) <= 0:
            raise SlmError(f"ul2r.weights: {len(chosen)} non-negative weights needed for the {name} mixture "
                           f"({', '.join(d.name for d in chosen)}), got {weights}")
        chosen = tuple(Denoiser(d.kind, d.mean_span, d.rate, w) for d, w in zip(chosen, weights))
    total = sum(d.weight for d in chosen)
    return tuple(Denoiser(d.kind, d.mean_span, d.rate, d.weight / total) for d in chosen)


def spans(length: int, denoiser: Denoiser) -> int:
    """How many spans a ``length``-token window is corrupted in (0 for S)."""
    if denoiser.kind == "S":
        return 0
    inputs, targets = corrupted_lengths(length, denoiser.rate, denoiser.mean_span)
    return (inputs + targets - 2 - length) // 2  # inputs = clean + spans + 1, targets = noise + spans + 1


def max_spans(denoisers, length: int) -> int:
    return max((spans(length, d) for d in denoisers), default=0)


def example_width(denoisers, length: int) -> int:
    """Tokens of the longest example a ``length``-token window gives: mode + window + a sentinel per span twice
    + EOS (S examples are mode + window)."""
    return length + 2 * max_spans(denoisers, length) + 2


def prefix_split(length: int, rate: float, rng: np.random.Generator) -> int:
    """T5's random_prefix_noise_mask: how many of ``length`` tokens stay in the prefix."""
    most = length - 1
    least = min(most, max(1, round((1 - 2 * rate) * length)))
    return int(rng.integers(least, most)) if most > least else most


def make_example(tokens: np.ndarray, denoiser: Denoiser, rng: np.random.Generator, sentinels: np.ndarray,
                 mode_id: int, eos_id: int) -> tuple[np.ndarray, int]:
    """(sequence, prefix length) for one window: ``sequence[:prefix]`` is mode + prefix, the rest the target."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if denoiser.kind == "S":
        split = prefix_split(len(tokens), denoiser.rate, rng)
        return np.concatenate([[mode_id], tokens]), split + 1
    noise = random_spans_noise_mask(len(tokens), denoiser.rate, denoiser.mean_span, rng)
    inputs, targets = corrupt(tokens, noise, sentinels, eos_id)
    prefix = np.concatenate([[mode_id], inputs[:-1]])  # the input's EOS is dropped: the target follows directly
    return np.concatenate([prefix, targets]), len(prefix)


def prefix_lm_mask(prefix_lens: torch.Tensor, width: int) -> torch.Tensor:
    """[B, T, T] bool: causal attention, plus every query sees all of its row's prefix (bidirectional prefix)."""
    keys = torch.arange(width, device=prefix_lens.device)
    causal = keys[None, :] <= keys[:, None]
    return causal[None] | (keys[None, None, :] < prefix_lens[:, None, None])


class MixtureBatches:
    """Batches of denoised windows: each window draws its denoiser by the mixture's weights (seeded by the
    window's index, so a resumed run sees the same examples); rows are right-padded to one width."""

    def __init__(self, dataset, seed: int, denoisers, sentinels: np.ndarray, mode_ids: dict[str, int],
                 eos_id: int, pad_id: int, shuffle: bool = True):
        self.dataset, self.seed, self.denoisers, self.shuffle = dataset, seed, tuple(denoisers), shuffle
        self.sentinels, self.mode_ids, self.eos_id, self.pad_id = sentinels, mode_ids, eos_id, pad_id
        self.weights = np.array([d.weight for d in self.denoisers])
        self.width = example_width(self.denoisers, dataset.seq_len + 1)
        if max_spans(self.denoisers, dataset.seq_len + 1) > len(sentinels):
            raise SlmError(f"ul2r: a {dataset.seq_len + 1}-token window needs up to "
                           f"{max_spans(self.denoisers, dataset.seq_len + 1)} sentinels, the tokenizer has "
                           f"{len(sentinels)}")

    def example(self, k: int) -> tuple[np.ndarray, int, Denoiser]:
        rng = np.random.default_rng([self.seed, k, 0x0712])
        window = self.dataset.sample(k, self.seed) if self.shuffle else self.dataset.window(k)
        denoiser = self.denoisers[int(rng.choice(len(self.denoisers), p=self.weights))]
        seq, prefix = make_example(window, denoiser, rng, self.sentinels, self.mode_ids[denoiser.mode], self.eos_id)
        return seq, prefix, denoiser

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        examples = [self.example(k)[:2] for k in indices]
        t = self.width - 1
        ids = torch.full((len(examples), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
        prefix = torch.zeros(len(examples), dtype=torch.long)
        for r, (seq, p) in enumerate(examples):
            seq = torch.from_numpy(seq)
            n = len(seq) - 1
            ids[r, :n] = seq[:-1]
            labels[r, p - 1:n] = seq[p:]  # position i predicts token i + 1: the target tokens only
            prefix[r] = p
        return {"input_ids": ids, "labels": labels, "prefix_len": prefix}
