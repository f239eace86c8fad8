"""The global step plan from sample sizes: the same on every rank, whatever the layout (see ``loader.py``).

``StepPlanner.plan`` gives the next global step: which samples (each slot draws its source by weight, then the
source's next usable sample in its shuffled order), and, packed, which row each goes to (first fit in arrival
order; the first sample that fits no row waits for its modality's next step). It reads sizes only.

Every rank computes the whole plan, so its cost is per rank and must stay small next to the step. It is
vectorised without changing a single choice (a test compares it with a plain one-sample-at-a-time reference):

* the slots' sources come from ``WeightedChooser.take`` in blocks, and the ones not used are given back;
* each source keeps a look-ahead of its next draws (``SamplePlanner.indices``: table-driven Feistel rounds over
  many counters at once) with their usable flags from the size table; a slot takes the source's next usable
  draw, the unusable ones before it are counted as skipped; draws are committed only when used;
* first fit places a block at a time (``FirstFit.place_many``: binary search over the rows' record rooms).

Excluded samples (``exclude``, ``data.skip_samples``) are skipped like unusable ones wherever they are drawn and
counted apart (``excluded_total``). The state (``state_dict``) knows sources by name and content; how it is
applied to an edited data section: ``plan_state.py``.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vlpretrain.config import Config, ConfigError
from vlpretrain.data import plan_state
from vlpretrain.data.manifest import load_manifest, open_source
from vlpretrain.data.packing import FirstFit
from vlpretrain.data.sample_order import ModalitySchedule, SamplePlanner
from vlpretrain.data.sizes import SizeTable
from vlpretrain.data.sources import IndexedSource, Source
from vlpretrain.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BAD = 1000


@dataclass(frozen=True)
class Slot:
    """One sample of a global step, as planned from its size."""
    source: int
    index: int
    tokens: int  # input tokens, image placeholders included
    labels: int  # supervised tokens
    images: int


@dataclass
class StepPlan:
    """One global step, the same on every rank."""
    step: int
    modality: str  # "text" | "multimodal" | "mixed"
    table: np.ndarray  # (slots, 5) int64: source, index, tokens, labels, images of every slot, in draw order
    rows: list[list[int]]  # the slots of every sequence (packed: first fit; else one slot per sequence)
    totals: dict  # the GlobalBatch fields that describe the whole step (equal on every rank)

    @cached_property
    def slots(self) -> list[Slot]:
        """Every slot (built on demand: a rank needs only its own rows' ones, ``slots_of``)."""
        return [Slot(*r) for r in self.table.tolist()]

    def slots_of(self, rows: list[list[int]]) -> list[list[Slot]]:
        flat = [k for row in rows for k in row]
        got = iter([Slot(*r) for r in self.table[flat].tolist()] if flat else [])
        return [[next(got) for _ in row] for row in rows]


class _Lookahead:
    """A source's next draws from counter ``start`` on: the positions (relative to ``start``) and sample
    indices of the usable ones among the first ``length``. ``limit``: how many slots it can serve before
    MAX_CONSECUTIVE_BAD unusable draws in a row (None while not met)."""

    def __init__(self, start: int, table: SizeTable):
        self.start, self.table, self.length, self.limit = start, table, 0, None
        self.pos = np.zeros(0, np.int64)
        self.idx = np.zeros(0, np.int64)
        self.xpos = np.zeros(0, np.int64)  # positions of excluded draws (skipped, counted apart from bad ones)


class StepPlanner:
    """Plans global steps from sample sizes. Identical on every rank; reads no sample text."""

    def __init__(self, cfg: Config, tokenizer: TextTokenizer):
        self.cfg = cfg
        manifest = load_manifest(cfg.data)
        self.sources: list[Source] = [open_source(s, manifest.base, cfg.train.seq_len) for s in manifest.sources]
        if not self.sources:
            raise ConfigError("config error: data has no sources (data.sources or data.manifest)")
        for src in self.sources:
            if len(src) == 0:
                raise ConfigError(f"data error: source '{src.name}' has no samples")
        self.skip_samples = parse_skip_samples(cfg.data.skip_samples, self.sources)  # before the size tables
        self.content_ids = [s.content_id() for s in self.sources]  # what the data state knows them by
        self.tables: list[SizeTable] = [src.size_table(tokenizer, cfg.data.system_prompt, cfg.model.vocab_size)
                                        for src in self.sources]
        self.image_tokens, self.seq_len = cfg.model.image_tokens, cfg.train.seq_len
        self.schedule = ModalitySchedule(cfg.data.language_ratio)
        self.planner = SamplePlanner([len(s) for s in self.sources], [s.modality for s in self.sources],
                                     [s.cfg.weight for s in self.sources], cfg.train.seed, self.schedule,
                                     cfg.data.group_by_modality)
        self.bad_total = {s.name: 0 for s in self.sources}
        self.excluded_total = {s.name: 0 for s in self.sources}  # draws skipped because they were excluded
        self.excluded: list[set[int]] = [set() for _ in self.sources]  # sample indices never drawn (exclude)
        self.retired: dict[str, dict] = {}  # saved state of sources no longer configured (plan_state.py)
        self.carry: dict[str, Slot] = {}  # packing: a drawn sample waiting for its modality's next step
        self._warned: set[str] = set()
        self._ahead: dict[int, _Lookahead] = {}
        self._bad_masks: dict[int, tuple[SizeTable, np.ndarray]] = {}
        self._excluded_masks: dict[int, np.ndarray] = {}
        self.exclude(self.skip_samples)
        self._last_count: dict[str, int] = {}  # slots of the modality's last step: the first block's size
        for i in range(len(self.sources)):
            self._probe(i)

    def slot(self, source: int, index: int) -> Slot | str:
        """The sample's planned size, or why it cannot be used."""
        t = self.tables[source]
        reason = t.reasons.get(index)
        if reason is not None:
            return reason
        images = int(t.images[index])
        n = int(t.text[index]) + images * self.image_tokens
        if n > self.seq_len:
            return f"sample of {n} tokens is longer than seq_len={self.seq_len}"
        return Slot(source, index, n, int(t.labels[index]), images)

    def _probe(self, i: int) -> None:
        """Fail fast on a source none of whose first samples can be used (a wrong path, format or tokenizer), or
        a corpus most of whose first chunks hold ids beyond model.vocab_size (made with another tokenizer)."""
        src, n = self.sources[i], min(len(self.sources[i]), 20)
        if isinstance(src, IndexedSource):
            vocab = self.cfg.model.vocab_size
            out = [j for j in range(n) if "vocabulary" in self.tables[i].reasons.get(j, "")]
            if 2 * len(out) > n:
                top = max(int(src.tokens(j).max()) for j in out)
                raise ConfigError(
                    f"data error: source '{src.name}' ({src.cfg.path}) does not fit this model: {len(out)} of its "
                    f"first {n} chunks hold token ids >= model.vocab_size={vocab} (up to {top}): was it "
                    f"tokenized with another tokenizer?")
        errors = []
        for j in range(n):
            got = self.slot(i, j)
            if isinstance(got, Slot):
                return
            errors.append(got)
        raise ConfigError(f"data error: source '{src.name}' is unreadable: none of its first samples can be used "
                          f"(first error: {errors[0]})")

    # ---- per-source look-ahead of usable draws

    def _excluded(self, source: int, idx: np.ndarray) -> np.ndarray:
        if not self.excluded[source]:
            return np.zeros(len(idx), bool)
        mask = self._excluded_masks.get(source)
        if mask is None:
            mask = self._excluded_masks[source] = np.zeros(len(self.tables[source]), bool)
            mask[np.fromiter(self.excluded[source], np.int64, len(self.excluded[source]))] = True
        return mask[idx]

    def _usable(self, source: int, idx: np.ndarray) -> np.ndarray:
        t = self.tables[source]
        ok = t.text[idx].astype(np.int64) + t.images[idx].astype(np.int64) * self.image_tokens <= self.seq_len
        if t.reasons:
            cached = self._bad_masks.get(source)
            if cached is None or cached[0] is not t:
                mask = np.zeros(len(t), bool)
                mask[np.fromiter(t.reasons, np.int64, len(t.reasons))] = True
                cached = self._bad_masks[source] = (t, mask)
            ok &= ~cached[1][idx]
        return ok

    def _lookahead(self, source: int, need: int) -> _Lookahead:
        """The source's look-ahead holding ``need`` usable draws, or fewer where MAX_CONSECUTIVE_BAD unusable
        ones in a row come first (then ``limit`` says how many)."""
        la, start = self._ahead.get(source), self.planner.counters[source]
        if la is None or la.start != start or la.table is not self.tables[source]:
            la = self._ahead[source] = _Lookahead(start, self.tables[source])
        while len(la.pos) < need and la.limit is None:
            m = max(1024, (need - len(la.pos)) * 5 // 4 + 64)
            idx = self.planner.indices(source, la.start + la.length, m)
            excluded = self._excluded(source, idx)
            ok = self._usable(source, idx) & ~excluded
            la.xpos = np.concatenate([la.xpos, np.flatnonzero(excluded) + la.length])
            la.pos = np.concatenate([la.pos, np.flatnonzero(ok) + la.length])
            la.idx = np.concatenate([la.idx, idx[ok]])
            la.length += m
            runs = np.diff(la.pos, prepend=-1) - 1  # unusable draws before each usable one
            stuck = np.flatnonzero(runs >= MAX_CONSECUTIVE_BAD)
            if stuck.size:
                la.limit = int(stuck[0])
            elif la.length - (int(la.pos[-1]) + 1 if len(la.pos) else 0) >= MAX_CONSECUTIVE_BAD:
                la.limit = len(la.pos)
        return la

    def _commit(self, source: int, used: int, first_slot: np.ndarray, bad: dict, first_bad: dict,
                at: int) -> None:
        """The first ``used`` usable draws of the source's look-ahead are taken (by slots ``at + first_slot``):
        advance its counter past them and count the unusable ones skipped on the way."""
        la = self._ahead[source]
        pos = la.pos[:used]
        drawn = int(pos[-1]) + 1
        name = self.sources[source].name
        excluded = int(np.searchsorted(la.xpos, drawn))
        self.excluded_total[name] += excluded
        skipped = drawn - used - excluded
        if skipped:
            # bad draws before each slot's sample: all unusable ones less the excluded ones
            cum = pos - np.arange(used) - np.searchsorted(la.xpos, pos)
            j = int(np.flatnonzero(cum)[0])  # the first slot that skipped a bad one
            first_bad.setdefault(name, at + int(first_slot[j]))
            bad[name] = bad.get(name, 0) + skipped
            self.bad_total[name] += skipped
            if name not in self._warned:
                self._warned.add(name)
                prev = int(pos[j - 1]) + 1 if j else 0
                k = next(k for k in range(prev, int(pos[j])) if k not in set(la.xpos.tolist()))
                index = int(self.planner.indices(source, la.start + k, 1)[0])
                log.warning("skipping bad sample %s of source %s: %s (further ones are only counted)",
                            self.sources[source].key(index), name, self.slot(source, index))
        self.planner.counters[source] += drawn
        la.start += drawn
        la.length -= drawn
        la.pos, la.idx = la.pos[used:] - drawn, la.idx[used:]
        la.xpos = la.xpos[excluded:] - drawn
        if la.limit is not None:
            la.limit -= used

    # ---- planning

    def plan(self) -> StepPlan:
        """The next global step. Without packing there is one sample per sequence; with packing, as many as fit
        the step's sequences, placed first fit (``packing.FirstFit``); the first sample that fits no row waits
        for this modality's next step (it is part of the data state)."""
        step, modality = self.planner.next_step()
        rows, packed = self.cfg.train.global_batch_size, self.cfg.data.packing
        bad: dict[str, int] = {}
        first_bad: dict[str, int] = {}  # slot of each source's first skip (the order of ``bad``, as drawn)
        parts: list[np.ndarray] = []
        n = 0
        fit = FirstFit(self.seq_len, rows) if packed else None
        carry = self.carry.pop(modality, None) if packed else None
        if carry is not None:
            s = carry
            if fit.place(s.tokens, 0) is None:
                self.carry[modality] = carry
            else:
                parts.append(np.array([[s.source, s.index, s.tokens, s.labels, s.images]], np.int64))
                n = 1
        while carry is None or n:  # (a carry that fits no row, only if seq_len shrank, leaves the step empty)
            want = rows - n if not packed else max(64, self._last_count.get(modality, 0) + 32 - n, n // 8)
            choices = self.planner.take_sources(modality, want)
            block, limit = self._block(np.array(choices, np.int64))
            if packed:
                placed = len(fit.place_many(block[:limit, 2].tolist(), range(n, n + limit)))
            else:
                placed = limit
            if placed == limit < want:
                src = self.sources[choices[limit]]
                raise RuntimeError(f"data error: {MAX_CONSECUTIVE_BAD} consecutive bad samples in source "
                                   f"'{src.name}'")
            used = placed + 1 if placed < limit else placed  # the one that fits no row is drawn: it waits
            ch = np.array(choices[:used], np.int64)
            for s in np.unique(ch).tolist():
                where = np.flatnonzero(ch == s)
                self._commit(s, len(where), where, bad, first_bad, n)
            self.planner.give_back_sources(modality, choices[used:])
            parts.append(block[:placed])
            n += placed
            if placed < limit:
                self.carry[modality] = Slot(*block[placed].tolist())
                break
            if not packed:
                break
        table = np.concatenate(parts) if parts else np.zeros((0, 5), np.int64)
        self._last_count[modality] = n
        layout = fit.rows if packed else [[k] for k in range(rows)]
        bad = {k: bad[k] for k in sorted(bad, key=first_bad.__getitem__)}
        return StepPlan(step, modality, table, layout, self._totals(step, table, bad))

    def _block(self, choices: np.ndarray) -> tuple[np.ndarray, int]:
        """The slots drawn by these source choices (rows of source, index, tokens, labels, images), and how
        many of them can be drawn before a source meets MAX_CONSECUTIVE_BAD unusable samples in a row."""
        block = np.zeros((len(choices), 5), np.int64)
        limit = len(choices)
        for s in np.unique(choices).tolist():
            where = np.flatnonzero(choices == s)
            la = self._lookahead(s, len(where))
            k = min(len(where), len(la.pos) if la.limit is None else la.limit)
            if k < len(where):
                limit = min(limit, int(where[k]))
            t, idx, at = self.tables[s], la.idx[:k], where[:k]
            images = t.images[idx]
            block[at, 0] = s
            block[at, 1] = idx
            block[at, 2] = t.text[idx] + images.astype(np.int64) * self.image_tokens
            block[at, 3] = t.labels[idx]
            block[at, 4] = images
        return block, limit

    def _totals(self, step: int, table: np.ndarray, bad: dict[str, int]) -> dict:
        src, idx = table[:, 0], table[:, 1]
        counts: dict[str, int] = {}
        keys: list = [None] * len(table)
        ids, first, count = np.unique(src, return_index=True, return_counts=True)
        for k in np.argsort(first, kind="stable").tolist():  # in order of first appearance
            s = int(ids[k])
            counts[self.sources[s].name] = int(count[k])
            key, where = self.sources[s].key, np.flatnonzero(src == s)
            for p, i in zip(where.tolist(), idx[where].tolist()):
                keys[p] = key(i)
        return dict(
            num_label_tokens=int(table[:, 3].sum()), num_tokens=int(table[:, 2].sum()),
            num_images=int(table[:, 4].sum()), num_samples=len(table),
            # the schedule applies to grouped steps only; mixed steps have no language:multimodal target
            **self._language_share(step),
            samples_digest=hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16],
            source_counts=counts, bad_samples=bad, data_state=self.state_dict())

    # ---- excluded samples, attribution, state

    def exclude(self, samples: Iterable[tuple[int, int]]) -> int:
        """Never draw these samples ((source position, sample index) pairs) from the next ``plan()`` on: a draw
        of one is skipped like an unusable sample (the slot takes the source's next usable draw) and counted in
        ``excluded_total``. Deterministic: excluding a sample before its draw changes nothing before it. A
        carried sample (drawn, waiting for its packed step) that is excluded is dropped. Returns how many were
        new."""
        new = 0
        for source, index in samples:
            source, index = int(source), int(index)
            if not 0 <= source < len(self.sources) or not 0 <= index < len(self.sources[source]):
                raise IndexError(f"no sample {index} in source {source}")
            if index in self.excluded[source]:
                continue
            self.excluded[source].add(index)
            self._ahead.pop(source, None)
            self._excluded_masks.pop(source, None)
            new += 1
        self.carry = {m: c for m, c in self.carry.items() if c.index not in self.excluded[c.source]}
        return new

    def describe(self, source: int, index: int) -> dict:
        """One sample, for a user to find it: source name, file or shard and key, modality, planned size."""
        src, t = self.sources[source], self.tables[source]
        out = {"source": src.name, "index": int(index), "key": src.key(index), **src.where(index),
               "modality": src.modality, "tokens": int(t.text[index]) + int(t.images[index]) * self.image_tokens,
               "labels": int(t.labels[index]), "images": int(t.images[index])}
        reason = t.reasons.get(index)
        if reason is not None:
            out["bad"] = reason
        return out

    def _language_share(self, step: int) -> dict:
        """Grouped: the target and realised share of language steps; mixed: of language samples (no target
        when only one modality is configured)."""
        p = self.planner
        if self.cfg.data.group_by_modality:
            return dict(language_ratio_target=self.schedule.ratio(step),
                        language_ratio_realized=p.language_steps / step)
        both = all(p.by_modality.values())
        samples = p.mixed.samples + p.mixed.used
        return dict(language_ratio_target=self.schedule.ratio(step) if both else None,
                    language_ratio_realized=p.mixed.language_samples() / max(samples, 1))

    def state_dict(self) -> dict:
        """The planner's position, by source name and content (``plan_state.py``): small, taken every step."""
        return plan_state.save(self)

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from ``state``, also under a changed data configuration (the rules: ``plan_state.py``);
        returns one line per change applied, for the caller to print once. A change that cannot be applied
        raises ``ConfigError`` naming the key."""
        self._ahead, self._excluded_masks = {}, {}
        return plan_state.load(self, state)


def parse_skip_samples(entries: list[str], sources: list[Source]) -> list[tuple[int, int]]:
    """``data.skip_samples`` ("<source name>:<sample index>") as (source position, index); one line naming the
    key for an unknown source or an index out of range."""
    where = {s.name: i for i, s in enumerate(sources)}
    out = []
    for k, entry in enumerate(entries):
        name, sep, index = str(entry).rpartition(":")
        key = f"data.skip_samples[{k}]"
        if not sep or not index.strip().isdigit():
            raise ConfigError(f"config error: {key}: '{entry}' is not '<source name>:<sample index>'")
        if name not in where:
            raise ConfigError(f"config error: {key}: no source named '{name}' (sources: {', '.join(where)})")
        i, n = where[name], int(index)
        if n >= len(sources[i]):
            raise ConfigError(f"config error: {key}: source '{name}' has {len(sources[i])} samples, no sample {n}")
        out.append((i, n))
    return out
