"""Modality-grouped sampling with the language-share warm-up (paper: start 1.0, warm down to 0.7).

``ModalitySchedule`` gives the target language share r(step) and decides each global step's modality by
deterministic error diffusion: after any step t, |language steps so far - sum of r(1..t)| < 1.
``SamplePlanner`` picks each slot's source (``WeightedChooser``) and sample (``FeistelPermutation`` per epoch);
its state is a small dict, so a resumed run continues the exact sequence.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

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


class FeistelPermutation:
    """A bijection of [0, n) keyed by (seed, ...), in O(1) memory: a 4-round Feistel network on the smallest
    even-bit domain >= n, with cycle walking. Lets a source of any size be visited in a shuffled order per
    epoch without materialising a permutation."""

    def __init__(self, n: int, *key: int):
        self.n = n
        bits = max(2, (max(n - 1, 1)).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.sha256(repr((n,) + key).encode()).digest()
        self.keys = [int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(4)]

    def _round(self, x: int, k: int) -> int:
        h = hashlib.blake2b((x ^ k).to_bytes(16, "little"), digest_size=8).digest()
        return int.from_bytes(h, "little") & self.mask

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        # _round inlined (the planner calls this once per drawn sample: the hot path of planning)
        blake2b, from_bytes, half, mask, keys, n = hashlib.blake2b, int.from_bytes, self.half, self.mask, \
            self.keys, self.n
        x = i
        while True:
            left, right = x >> half, x & mask
            for k in keys:
                h = blake2b((right ^ k).to_bytes(16, "little"), digest_size=8).digest()
                left, right = right, left ^ (from_bytes(h, "little") & mask)
            x = (left << half) | right
            if x < n:
                return x


class WeightedChooser:
    """Deterministic weighted choice by Balinski and Young's quota method: after k draws every choice's count
    is within one of k x its weight share (smooth round-robin breaks that bound beyond three choices)."""

    def __init__(self, weights: list[float]):
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.counts = [0] * len(weights)

    def next(self) -> int:
        k = sum(self.counts) + 1
        # eligible: a choice that stays at or below its upper quota ceil(k x share) after this draw
        eligible = [i for i, (w, c) in enumerate(zip(self.weights, self.counts)) if c < math.ceil(k * w - 1e-12)]
        best = max(eligible or range(len(self.weights)), key=lambda i: self.weights[i] / (self.counts[i] + 1))
        self.counts[best] += 1
        return best


@dataclass
class Draw:
    source: int
    index: int  # sample index inside the source
    counter: int  # the source's draw counter that produced it (epoch = counter // len)


class SamplePlanner:
    """Which sample fills each slot of each global step: a deterministic function of the seed and the step
    sequence, the same on every rank whatever the layout, saved and restored as a small state dict.

    Per source, draws walk a fresh shuffled order every epoch (``FeistelPermutation`` keyed by seed, source,
    epoch); sources are blended by weight within a modality (``WeightedChooser``); the step's modality comes
    from the ``ModalitySchedule``.
    """

    def __init__(self, sizes: list[int], modalities: list[str], weights: list[float], seed: int,
                 schedule: ModalitySchedule, group_by_modality: bool):
        self.sizes, self.modalities, self.seed = sizes, modalities, seed
        self.schedule, self.group = schedule, group_by_modality
        self.by_modality = {m: [i for i, x in enumerate(modalities) if x == m] for m in ("text", "multimodal")}
        self.choosers = {m: WeightedChooser([weights[i] for i in idx]) for m, idx in self.by_modality.items() if idx}
        self.mixed = WeightedChooser(weights)
        self.counters = [0] * len(sizes)
        self.step = 0  # global steps planned so far (this object is the only one that advances it)
        self.language_steps = 0  # of which all-language
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}

    def modality(self, step: int) -> str:
        if not self.group:
            return "mixed"
        has_text, has_mm = bool(self.by_modality["text"]), bool(self.by_modality["multimodal"])
        if has_text and has_mm:
            return "text" if self.schedule.is_language(step) else "multimodal"
        return "text" if has_text else "multimodal"

    def next_step(self) -> tuple[int, str]:
        """Advance to the next global step: (step, its modality)."""
        self.step += 1
        modality = self.modality(self.step)
        self.language_steps += modality == "text"
        return self.step, modality

    def next_source(self, modality: str) -> int:
        if modality == "mixed":
            return self.mixed.next()
        return self.by_modality[modality][self.choosers[modality].next()]

    def draw(self, source: int) -> Draw:
        c = self.counters[source]
        self.counters[source] += 1
        n = self.sizes[source]
        epoch = c // n
        perm = self._perms.get((source, epoch))
        if perm is None:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source}  # keep one epoch per source
            perm = self._perms[(source, epoch)] = FeistelPermutation(n, self.seed, source, epoch)
        return Draw(source, perm(c % n), c)

    def epochs(self) -> list[int]:
        return [c // n for c, n in zip(self.counters, self.sizes)]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "counters": list(self.counters), "epochs": self.epochs(),
                "chooser_counts": {m: list(ch.counts) for m, ch in self.choosers.items()},
                "mixed_counts": list(self.mixed.counts), "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        if state["sizes"] != self.sizes or state["seed"] != self.seed:
            raise ValueError(f"data state was saved for sources of sizes {state['sizes']} and seed "
                             f"{state['seed']}, not {self.sizes} / {self.seed}")
        self.step = state["step"]
        self.counters = list(state["counters"])
        for m, counts in state["chooser_counts"].items():
            self.choosers[m].counts = list(counts)
        self.mixed.counts = list(state["mixed_counts"])
