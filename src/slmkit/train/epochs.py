"""The order a training task visits its items in: a fresh permutation each epoch, a function of the seed
and the epoch alone, so a resumed run draws exactly what the uninterrupted one would."""

from __future__ import annotations

import numpy as np

from ..errors import SlmError


class EpochOrder:
    """Which of ``size`` items the global sample ``k`` is: epoch ``k // size`` visits them in the permutation
    drawn from ``numpy.random.default_rng([seed, epoch])`` (the latest epoch's permutation is kept)."""

    def __init__(self, size: int):
        self.size = size
        self._order: tuple[tuple[int, int], np.ndarray] | None = None

    def permutation(self, epoch: int, seed: int) -> np.ndarray:
        key = (int(seed), int(epoch))
        if self._order is None or self._order[0] != key:
            self._order = key, np.random.default_rng(list(key)).permutation(self.size)
        return self._order[1]

    def __call__(self, k: int, seed: int) -> int:
        if self.size == 0:
            raise SlmError("no items to draw from")
        epoch, position = divmod(int(k), self.size)
        return int(self.permutation(epoch, seed)[position])
