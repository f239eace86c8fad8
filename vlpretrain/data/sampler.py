"""Modality-grouped sampling with the language-share warm-up (paper: start 1.0, warm down to 0.7).

``ModalitySchedule`` gives the target language share r(step) and decides each global step's modality by
deterministic error diffusion: after any step t, |language steps so far - sum of r(1..t)| < 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlpretrain.config import LanguageRatioConfig


class ModalitySchedule:
    def __init__(self, cfg: LanguageRatioConfig):
        self.cfg = cfg
        self._cum = [0.0]  # sum of r over steps 1..t
        self._lang = [0]  # language steps among 1..t

    def ratio(self, step: int) -> float:
        """Target language share at global step ``step`` (1-based)."""
        c = self.cfg
        if c.warmup_steps <= 0:
            return c.end
        x = min(max(step - 1, 0) / c.warmup_steps, 1.0)
        if c.shape == "linear":
            f = x
        elif c.shape == "cosine":
            f = 0.5 * (1 - math.cos(math.pi * x))
        else:  # step: the start share until warm-up ends, then the target
            f = 1.0 if x >= 1.0 else 0.0
        return c.start + (c.end - c.start) * f

    def _extend(self, step: int) -> None:
        while len(self._cum) <= step:
            t = len(self._cum)
            cum = self._cum[-1] + self.ratio(t)
            self._cum.append(cum)
            # the realised count is the rounded cumulative target: off by <= 0.5, and it grows by 0 or 1
            # per step because r lies in [0, 1]
            self._lang.append(math.floor(cum + 0.5))

    def is_language(self, step: int) -> bool:
        self._extend(step)
        return self._lang[step] > self._lang[step - 1]

    def realized(self, step: int) -> float:
        """Share of language steps among steps 1..step."""
        self._extend(step)
        return self._lang[step] / max(step, 1)

    def deviation(self, step: int) -> float:
        self._extend(step)
        return self._lang[step] - self._cum[step]


@dataclass
class SourceCursor:
    """An epoch-shuffled walk over one source's records."""

    size: int
    seed: int
    epoch: int = 0
    pos: int = 0
    _perm: np.ndarray | None = None

    def next(self) -> int:
        if self._perm is None or self.pos >= self.size:
            if self._perm is not None:
                self.epoch, self.pos = self.epoch + 1, 0
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        idx = int(self._perm[self.pos])
        self.pos += 1
        return idx


class WeightedChooser:
    """Deterministic weighted choice (smooth weighted round-robin): realised counts track the weights."""

    def __init__(self, weights: list[float]):
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.credit = [0.0] * len(weights)

    def next(self) -> int:
        for i, w in enumerate(self.weights):
            self.credit[i] += w
        best = max(range(len(self.credit)), key=lambda i: self.credit[i])
        self.credit[best] -= 1.0
        return best
