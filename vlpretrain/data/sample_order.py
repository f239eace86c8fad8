"""Modality-grouped sampling with the language-share warm-up (paper: start 1.0, warm down to 0.7).

``ModalitySchedule`` gives the target language share r(step) and decides each global step's modality by
deterministic error diffusion: after any step t, |language steps so far - sum of r(1..t)| < 1.
Mixed steps (``group_by_modality: false``) follow the same target per sample instead (``MixedChooser``: each
slot's modality by error diffusion over slots, so the expected language share of the samples is r(step)).
``SamplePlanner`` picks each slot's source (``WeightedChooser`` within its modality) and sample
(``FeistelPermutation`` per epoch, keyed by the source's order key); its state is a small dict, so a resumed run
continues the exact sequence.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from vlpretrain.config import LanguageRatioConfig

TABLE_HALF_BITS = 16  # Feistel halves up to this width use lookup tables (4 x 2^16 hashes at most, ~0.1 s)


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

    def many(self, idx: np.ndarray) -> np.ndarray:
        """``[self(i) for i in idx]`` as an int64 array, vectorised: the round function of each key is tabulated
        over the whole half-width domain once per permutation (4 x 2^half hashes, half = bits / 2: about
        4 sqrt(n)), after which the rounds are table look-ups. The same values as ``__call__``, bit for bit
        (a test checks); halves wider than ``TABLE_HALF_BITS`` (n > 2^32) hash per element."""
        x = np.asarray(idx, dtype=np.int64)
        if x.size and (int(x.min()) < 0 or int(x.max()) >= self.n):
            raise IndexError(int(x.min()) if int(x.min()) < 0 else int(x.max()))
        if self.half > TABLE_HALF_BITS:
            return np.fromiter((self(int(i)) for i in x.ravel()), np.int64, x.size).reshape(x.shape)
        tables = self._tables()
        out, todo = x.copy(), np.arange(x.size)
        flat, cur = out.reshape(-1), x.reshape(-1)
        while todo.size:  # cycle walking: values that land outside [0, n) go round again
            left, right = cur >> self.half, cur & self.mask
            for t in tables:
                left, right = right, left ^ t[right]
            cur = (left << self.half) | right
            inside = cur < self.n
            flat[todo[inside]] = cur[inside]
            todo, cur = todo[~inside], cur[~inside]
        return out

    def _tables(self) -> list[np.ndarray]:
        t = getattr(self, "_t", None)
        if t is None:
            blake2b, from_bytes, mask = hashlib.blake2b, int.from_bytes, self.mask
            t = self._t = [np.array([from_bytes(blake2b((r ^ k).to_bytes(16, "little"), digest_size=8).digest(),
                                                "little") & mask for r in range(mask + 1)], dtype=np.int64)
                           for k in self.keys]
        return t

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

    def take(self, n: int) -> list[int]:
        """``[self.next() for _ in range(n)]``, the same choices, in one tight loop (the planner's hot path)."""
        w, counts, m = self.weights, self.counts, len(self.weights)
        if m == 1:
            counts[0] += n
            return [0] * n
        ceil, choices, out, k = math.ceil, range(m), [], sum(counts)
        for _ in range(n):
            k += 1
            best, top = -1, -1.0
            for i in choices:  # the first eligible choice of largest w / (c + 1), as max() picks it
                c = counts[i]
                if c < ceil(k * w[i] - 1e-12):
                    v = w[i] / (c + 1)
                    if v > top:
                        best, top = i, v
            if best < 0:
                best = max(choices, key=lambda i: w[i] / (counts[i] + 1))
            counts[best] += 1
            out.append(best)
        return out

    def give_back(self, choices: list[int]) -> None:
        """Undo the last ``take`` of these choices (the counts are the whole state, so this is exact)."""
        for i in choices:
            self.counts[i] -= 1


class MixedChooser:
    """Mixed steps: each slot's modality by error diffusion over the slots (after j slots of a step with target
    r, the language slots of the run are round(T + j r), T the target summed over earlier steps' slots), then
    its source by weight within that modality. ``take`` / ``give_back`` keep the state exact (integers and one
    float folded once per step)."""

    def __init__(self, choosers: dict[str, WeightedChooser], by_modality: dict[str, list[int]]):
        self.choosers, self.by_modality = choosers, by_modality
        self.target = 0.0  # language slots targeted before this step
        self.samples = 0  # slots before this step
        self.used, self.ratio = 0, 0.0  # this step's slots so far and its target share

    def start(self, ratio: float) -> None:
        self.target, self.samples = self.target + self.used * self.ratio, self.samples + self.used
        self.used, self.ratio = 0, ratio

    def _pattern(self, n: int) -> np.ndarray:
        """Language (True) or multimodal for this step's next ``n`` slots."""
        if not self.by_modality["multimodal"] or not self.by_modality["text"]:
            return np.full(n, bool(self.by_modality["text"]))
        j = np.arange(self.used, self.used + n + 1, dtype=np.int64)
        lang = np.floor(self.target + j * self.ratio + 0.5)
        return lang[1:] > lang[:-1]

    def take(self, n: int) -> list[int]:
        lang = self._pattern(n)
        out = np.zeros(n, np.int64)
        for m, mask in (("text", lang), ("multimodal", ~lang)):
            k = int(mask.sum())
            if k:
                idx = self.by_modality[m]
                out[mask] = [idx[c] for c in self.choosers[m].take(k)]
        self.used += n
        return out.tolist()

    def next(self) -> int:
        return self.take(1)[0]

    def give_back(self, sources: list[int], modality_of: list[str]) -> None:
        for m, ch in self.choosers.items():
            where = {s: i for i, s in enumerate(self.by_modality[m])}
            ch.give_back([where[s] for s in sources if modality_of[s] == m])
        self.used -= len(sources)

    def language_samples(self) -> int:
        """Language slots of the run so far (the current step's included)."""
        if not self.by_modality["multimodal"] or not self.by_modality["text"]:
            return self.samples + self.used if self.by_modality["text"] else 0
        return math.floor(self.target + self.used * self.ratio + 0.5)

    def state_dict(self) -> dict:
        return {"target": self.target, "samples": self.samples, "used": self.used, "ratio": self.ratio}

    def load_state_dict(self, state: dict) -> None:
        self.target, self.samples = float(state["target"]), int(state["samples"])
        self.used, self.ratio = int(state["used"]), float(state["ratio"])


@dataclass
class Draw:
    source: int
    index: int  # sample index inside the source
    counter: int  # the source's draw counter that produced it (epoch = counter // len)


class SamplePlanner:
    """Which sample fills each slot of each global step: a deterministic function of the seed and the step
    sequence, the same on every rank whatever the layout, saved and restored as a small state dict.

    Per source, draws walk a fresh shuffled order every epoch (``FeistelPermutation`` keyed by seed, the
    source's order key, epoch); sources are blended by weight within a modality (``WeightedChooser``); the
    step's modality (grouped) or each slot's (mixed) comes from the ``ModalitySchedule``. ``order_keys``: one per
    source, its position in a fresh run (a resumed run keeps each source's own, wherever it now is in the list).
    """

    def __init__(self, sizes: list[int], modalities: list[str], weights: list[float], seed: int,
                 schedule: ModalitySchedule, group_by_modality: bool, order_keys: list[int] | None = None):
        self.sizes, self.modalities, self.seed = sizes, modalities, seed
        self.schedule, self.group = schedule, group_by_modality
        self.order_keys = list(range(len(sizes))) if order_keys is None else list(order_keys)
        self.by_modality = {m: [i for i, x in enumerate(modalities) if x == m] for m in ("text", "multimodal")}
        self.choosers = {m: WeightedChooser([weights[i] for i in idx]) for m, idx in self.by_modality.items() if idx}
        self.mixed = MixedChooser(self.choosers, self.by_modality)
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
        if modality == "mixed":
            self.mixed.start(self.schedule.ratio(self.step))
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
        return Draw(source, self._perm(source, c // n)(c % n), c)

    def take_sources(self, modality: str, n: int) -> list[int]:
        """The next ``n`` sources of ``modality`` (``next_source`` n times); ``give_back_sources`` undoes a tail."""
        if modality == "mixed":
            return self.mixed.take(n)
        idx = self.by_modality[modality]
        return [idx[c] for c in self.choosers[modality].take(n)]

    def give_back_sources(self, modality: str, sources: list[int]) -> None:
        if modality == "mixed":
            return self.mixed.give_back(sources, self.modalities)
        where = {s: i for i, s in enumerate(self.by_modality[modality])}
        self.choosers[modality].give_back([where[s] for s in sources])

    def indices(self, source: int, start: int, count: int) -> np.ndarray:
        """Sample indices of the source's draws ``start .. start + count - 1`` (what ``draw`` would return for
        those counters), vectorised; the counters are not advanced."""
        n, out, c = self.sizes[source], np.empty(count, np.int64), start
        while c < start + count:
            epoch, a = divmod(c, n)
            b = min(n, a + start + count - c)
            out[c - start:c - start + b - a] = self._perm(source, epoch).many(np.arange(a, b))
            c += b - a
        return out

    def _perm(self, source: int, epoch: int) -> FeistelPermutation:
        perm = self._perms.get((source, epoch))
        if perm is None:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source}  # keep one epoch per source
            perm = self._perms[(source, epoch)] = FeistelPermutation(self.sizes[source], self.seed,
                                                                         self.order_keys[source], epoch)
        return perm

    def epochs(self) -> list[int]:
        return [c // n for c, n in zip(self.counters, self.sizes)]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "counters": list(self.counters), "epochs": self.epochs(),
                "chooser_counts": {m: list(ch.counts) for m, ch in self.choosers.items()},
                "mixed": self.mixed.state_dict(), "sizes": list(self.sizes), "order_keys": list(self.order_keys)}

    def load_state_dict(self, state: dict) -> None:
        """The positional state of the same sources (``StepPlanner`` maps a changed configuration by name). A
        state from before mixed steps followed the schedule ("mixed_counts") restarts the mixed slots' target."""
        self.step = state["step"]
        self.counters = list(state["counters"])
        for m, counts in state["chooser_counts"].items():
            self.choosers[m].counts = list(counts)
        if "mixed" in state:
            self.mixed.load_state_dict(state["mixed"])
        self.order_keys = list(state.get("order_keys", range(len(self.sizes))))
