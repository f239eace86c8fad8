"""From sources to fixed-shape global steps: one modality per step, layout-independent, resumable.

Every rank plans the WHOLE global step (which samples, their token ids: cheap) with the same deterministic
``SamplePlanner``, so the global sample sequence, the loss denominator and the sample digest are the same for
any dp size and worker count. Each rank then collates only its dp slice and decodes images only if it runs
the vision encoder. Bad samples are handled without breaking that determinism:

* unusable text (corrupt JSON, no text, placeholder/image mismatch, longer than the sequence) is seen by every
  rank alike while planning: the slot takes the source's next draw; counted per source, warned once;
* an undecodable image is seen only by the rank that decodes it: it is replaced by a blank image (the
  sample's text still trains) and counted in ``bad_images``.

A source with no usable sample among its first draws fails at start-up.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlpretrain.config import Config, ConfigError
from vlpretrain.data.packing import PackedRow, pack_samples, to_tensors
from vlpretrain.data.preprocess import resize_and_pad
from vlpretrain.data.sampler import ModalitySchedule, SamplePlanner
from vlpretrain.data.samples import IGNORE, EncodedSample, SampleEncoder
from vlpretrain.data.shards import BadSample
from vlpretrain.data.sources import Source, load_manifest, open_source
from vlpretrain.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BAD = 1000


def resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


@dataclass
class Microbatch:
    tokens: torch.Tensor  # (B, S) long
    labels: torch.Tensor  # (B, S) long, IGNORE where not supervised
    # (B, M, 3, H, W) uint8 (padded, resized; the engine scales to [0, 1] on the device: 4x less to move), or
    # float in [0, 1]; None on text steps and on ranks that do not run the vision encoder
    images: torch.Tensor | None
    positions: torch.Tensor | None = None  # (B, S) long, packed rows only (restart at each document)
    doc_ids: torch.Tensor | None = None  # (B, S) long, packed rows only (document-causal attention)


@dataclass
class Planned:
    source: int
    index: int
    key: str
    sample: EncodedSample
    record: dict


@dataclass
class GlobalBatch:
    step: int
    modality: str  # "text" | "multimodal" | "mixed"
    microbatches: list[Microbatch]  # this dp rank's share
    num_label_tokens: int  # supervised tokens in the whole global batch (the loss denominator)
    num_tokens: int  # non-pad input tokens in the whole global batch
    num_images: int
    num_samples: int  # documents in the global step (= sequences unless packed)
    language_ratio_target: float
    language_ratio_realized: float
    samples_digest: str  # hash of the ordered sample keys of the global step: equal across layouts
    source_counts: dict[str, int] = field(default_factory=dict)
    bad_samples: dict[str, int] = field(default_factory=dict)  # skipped while planning this step (global)
    bad_images: int = 0  # images this rank could not decode (replaced by blanks)
    data_state: dict = field(default_factory=dict)  # planner state after this step (for checkpoints)

    def pin_memory(self) -> "GlobalBatch":
        """Page-locked host tensors for asynchronous host-to-GPU copies (called by the DataLoader)."""
        for mb in self.microbatches:
            for name in ("tokens", "labels", "images", "positions", "doc_ids"):
                t = getattr(mb, name)
                if t is not None:
                    setattr(mb, name, t.pin_memory())
        return self


def _out_of_vocab(tokens, vocab_size: int) -> bool:
    return len(tokens) > 0 and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0)


class StepPlanner:
    """Plans global steps: the samples of every slot, encoded. Identical on every rank."""

    def __init__(self, cfg: Config, tokenizer: TextTokenizer):
        self.cfg = cfg
        manifest = load_manifest(cfg.data)
        self.sources: list[Source] = [open_source(s, manifest.base, cfg.train.seq_len) for s in manifest.sources]
        if not self.sources:
            raise ConfigError("config error: data has no sources (data.sources or data.manifest)")
        self.encoder = SampleEncoder(tokenizer, cfg.model.image_tokens, cfg.train.seq_len,
                                     cfg.data.system_prompt, truncate=False, vocab_size=cfg.model.vocab_size)
        self.schedule = ModalitySchedule(cfg.data.language_ratio)
        self.planner = SamplePlanner([len(s) for s in self.sources], [s.modality for s in self.sources],
                                     [s.cfg.weight for s in self.sources], cfg.train.seed, self.schedule,
                                     cfg.data.group_by_modality)
        self.bad_total = {s.name: 0 for s in self.sources}
        self.carry: dict[str, Planned] = {}  # packing: a drawn sample waiting for its modality's next step
        self._warned: set[str] = set()
        self.language_steps = 0
        for i, src in enumerate(self.sources):
            if len(src) == 0:
                raise ConfigError(f"data error: source '{src.name}' has no samples")
            self._probe(i)

    def _probe(self, i: int) -> None:
        """Fail fast on a source none of whose first samples can be used (a wrong path, format or tokenizer), or
        a corpus most of whose first chunks hold ids beyond model.vocab_size (made with another tokenizer)."""
        src, errors = self.sources[i], []
        n = min(len(src), 20)
        if src.tokens(0) is not None:
            out = [j for j in range(n) if _out_of_vocab(src.tokens(j), self.cfg.model.vocab_size)]
            if 2 * len(out) > n:
                top = max(int(src.tokens(j).max()) for j in out)
                raise ConfigError(
                    f"data error: source '{src.name}' ({src.cfg.path}) does not fit this model: {len(out)} of its "
                    f"first {n} chunks hold token ids >= model.vocab_size={self.cfg.model.vocab_size} (up to "
                    f"{top}): was it tokenized with another tokenizer?")
        for j in range(n):
            try:
                self.encode(src, j)
                return
            except (ValueError, KeyError, TypeError, OSError) as e:
                errors.append(str(e))
        raise ConfigError(f"data error: source '{src.name}' is unreadable: none of its first samples can be used "
                          f"(first error: {errors[0]})")

    def encode(self, src: Source, i: int) -> tuple[EncodedSample, dict]:
        toks = src.tokens(i)
        if toks is not None:
            return self.encoder.encode_tokens(toks), {"images": []}
        record = src.record(i)
        images = record.get("images") or []
        if not isinstance(images, list):
            raise ValueError("'images' must be a list")
        return self.encoder.encode(record), record

    def _fill(self, source: int, bad: dict[str, int]) -> Planned:
        src = self.sources[source]
        for _ in range(MAX_CONSECUTIVE_BAD):
            d = self.planner.draw(source)
            try:
                sample, record = self.encode(src, d.index)
                return Planned(source, d.index, src.key(d.index), sample, record)
            except (ValueError, KeyError, TypeError, OSError) as e:
                bad[src.name] = bad.get(src.name, 0) + 1
                self.bad_total[src.name] += 1
                if src.name not in self._warned:
                    self._warned.add(src.name)
                    where = f"{e.shard}:{e.key}" if isinstance(e, BadSample) else src.key(d.index)
                    log.warning("skipping bad sample %s of source %s: %s (further ones are only counted)",
                                where, src.name, e)
        raise RuntimeError(f"data error: {MAX_CONSECUTIVE_BAD} consecutive bad samples in source '{src.name}'")

    def plan(self) -> tuple[int, str, list[Planned], dict[str, int]]:
        """The next global step: (step, modality, the samples in order, bad samples skipped). Without packing
        there is one sample per sequence; with packing, as many as fit the step's sequences (``_pack``)."""
        self.planner.step += 1
        step = self.planner.step
        modality = self.planner.modality(step)
        bad: dict[str, int] = {}
        if self.cfg.data.packing:
            return step, modality, self._pack(modality, bad), bad
        slots = [self._fill(self.planner.next_source(modality), bad) for _ in range(self.cfg.train.global_batch_size)]
        return step, modality, slots, bad

    def _pack(self, modality: str, bad: dict[str, int]) -> list[Planned]:
        """Draw samples until the step's ``global_batch_size`` rows are full, placing each by first fit (the
        policy of ``packing.pack_samples``); the first sample that fits no row waits for this modality's next
        step (it is part of the data state)."""
        rows, seq_len, free, chosen = self.cfg.train.global_batch_size, self.cfg.train.seq_len, [], []
        while True:
            p = self.carry.pop(modality, None) or self._fill(self.planner.next_source(modality), bad)
            n = len(p.sample.tokens)
            for r, room in enumerate(free):
                if n <= room:
                    free[r] -= n
                    break
            else:
                if len(free) == rows:
                    self.carry[modality] = p
                    return chosen
                free.append(seq_len - n)
            chosen.append(p)

    def carry_state(self) -> dict:
        return {m: [p.source, p.index] for m, p in self.carry.items()}

    def load_carry(self, state: dict) -> None:
        self.carry = {}
        for m, (source, index) in state.items():
            sample, record = self.encode(self.sources[source], index)
            self.carry[m] = Planned(source, index, self.sources[source].key(index), sample, record)


class DataPipeline:
    """This rank's iterator of ``GlobalBatch``es (steps 1, 2, ... or from a restored state)."""

    def __init__(self, cfg: Config, tokenizer: TextTokenizer, dp_rank: int = 0, dp_size: int = 1,
                 load_images: bool = True, state: dict | None = None):
        self.cfg, self.tok = cfg, tokenizer
        self.dp_rank, self.dp_size, self.load_images = dp_rank, dp_size, load_images
        self.plans = StepPlanner(cfg, tokenizer)  # opens every source now: bad paths fail at start-up
        if state is not None:
            self.load_state_dict(state)
        self.first_step = self.plans.planner.step  # steps already consumed (resumed runs)
        m = cfg.model
        self.image_size = m.image_size
        self.pad_mean = m.sam.mean if m.sam.enabled else m.siglip.mean
        self._iter = None
        self._warned_images: set[str] = set()  # sources whose blank-image warning was given

    @property
    def sources(self) -> list[Source]:
        return self.plans.sources

    def state_dict(self) -> dict:
        return {"planner": self.plans.planner.state_dict(), "language_steps": self.plans.language_steps,
                "bad_total": dict(self.plans.bad_total), "carry": self.plans.carry_state()}

    def load_state_dict(self, state: dict) -> None:
        self.plans.planner.load_state_dict(state["planner"])
        self.plans.language_steps = state["language_steps"]
        self.plans.bad_total.update(state.get("bad_total", {}))
        self.plans.load_carry(state.get("carry", {}))

    # ---- building one step

    def _image(self, p: Planned, j: int, counter: list[int]) -> torch.Tensor:
        try:
            img = self.sources[p.source].image(p.index, j, p.record)
        except (BadSample, OSError, ValueError, KeyError) as e:
            counter[0] += 1
            name = self.sources[p.source].name
            if name not in self._warned_images:  # once per source: the metrics count the rest
                self._warned_images.add(name)
                log.warning("blank image for %s (image %d): %s (further ones in source %s are only counted)",
                            p.key, j, e, name)
            img = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return resize_and_pad(img, self.image_size, self.pad_mean)

    def _collate(self, items: list[Planned], modality: str, counter: list[int]) -> Microbatch:
        s, b = self.cfg.train.seq_len, len(items)
        tokens = torch.full((b, s), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE, dtype=torch.long)
        # image steps give every microbatch an image tensor (possibly with no image) so that all ranks run
        # the vision towers; text steps give None and skip them
        images = None
        if self.load_images and modality != "text":
            images = torch.zeros(b, max(len(p.sample.images) for p in items), 3, self.image_size, self.image_size,
                                 dtype=torch.uint8)
        for row, p in enumerate(items):
            tokens[row, :len(p.sample.tokens)] = torch.tensor(p.sample.tokens)
            labels[row, :len(p.sample.labels)] = torch.tensor(p.sample.labels)
            if images is not None:
                for j in range(len(p.sample.images)):
                    images[row, j] = self._image(p, j, counter)
        return Microbatch(tokens, labels, images)

    def _collate_packed(self, rows: list[PackedRow], slots: list[Planned], modality: str,
                        counter: list[int]) -> Microbatch:
        tokens, labels, positions, doc_ids = to_tensors(rows)
        images = None
        if self.load_images and modality != "text":
            images = torch.zeros(len(rows), max(len(r.images) for r in rows), 3, self.image_size, self.image_size,
                                 dtype=torch.uint8)
            for row, r in enumerate(rows):
                for j, (k, i) in enumerate(r.images):  # (sample index in the step, image index in it)
                    images[row, j] = self._image(slots[k], i, counter)
        if not self.cfg.data.document_causal:  # plain concatenation: no position reset, full causal attention
            positions = doc_ids = None
        return Microbatch(tokens, labels, images, positions, doc_ids)

    def build(self, step: int, modality: str, slots: list[Planned], bad: dict[str, int]) -> GlobalBatch:
        mbs = self.cfg.train.micro_batch_size
        counter = [0]
        if self.cfg.data.packing:
            refs = [EncodedSample(p.sample.tokens, p.sample.labels, [(k, j) for j in range(len(p.sample.images))])
                    for k, p in enumerate(slots)]
            rows = pack_samples(refs, self.cfg.train.seq_len, self.cfg.model.image_token_id, self.tok.pad_id)
            local = len(rows) // self.dp_size
            mine = rows[self.dp_rank * local:(self.dp_rank + 1) * local]
            micro = [self._collate_packed(mine[i:i + mbs], slots, modality, counter)
                     for i in range(0, len(mine), mbs)]
        else:
            local = len(slots) // self.dp_size
            mine = slots[self.dp_rank * local:(self.dp_rank + 1) * local]
            micro = [self._collate(mine[i:i + mbs], modality, counter) for i in range(0, len(mine), mbs)]
        counts: dict[str, int] = {}
        for p in slots:
            name = self.sources[p.source].name
            counts[name] = counts.get(name, 0) + 1
        digest = hashlib.sha1("\n".join(p.key for p in slots).encode()).hexdigest()[:16]
        self.plans.language_steps += modality == "text"
        return GlobalBatch(
            step=step, modality=modality, microbatches=micro,
            num_label_tokens=sum(sum(1 for x in p.sample.labels if x != IGNORE) for p in slots),
            num_tokens=sum(len(p.sample.tokens) for p in slots),
            num_images=sum(len(p.sample.images) for p in slots), num_samples=len(slots),
            language_ratio_target=self.plans.schedule.ratio(step),
            language_ratio_realized=self.plans.language_steps / step, samples_digest=digest,
            source_counts=counts, bad_samples=bad, bad_images=counter[0], data_state=self.state_dict())

    def __iter__(self):
        return self

    def __next__(self) -> GlobalBatch:
        return self.build(*self.plans.plan())

    def steps(self, pin_memory: bool = False):
        """Iterator over the coming steps; with ``data.num_workers`` > 0 worker processes prepare whole steps
        ahead (worker w builds the steps w, w + W, ... and plans every step to keep the sequence), pinned for
        fast copies to the GPU when ``pin_memory``."""
        if self.cfg.data.num_workers == 0:
            return (b.pin_memory() for b in self) if pin_memory else iter(self)
        loader = torch.utils.data.DataLoader(
            _WorkerSteps(self), batch_size=None, num_workers=self.cfg.data.num_workers,
            prefetch_factor=self.cfg.data.prefetch_steps, collate_fn=_identity, pin_memory=pin_memory)
        return iter(loader)

    def skipped(self) -> dict[str, int]:
        return dict(self.plans.bad_total)


def _identity(x):
    return x


class _WorkerSteps(torch.utils.data.IterableDataset):
    def __init__(self, pipeline: DataPipeline):
        self.pipeline = pipeline

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        p = self.pipeline
        while True:
            step, modality, slots, bad = p.plans.plan()
            if (step - 1 - p.first_step) % n == wid:
                yield p.build(step, modality, slots, bad)
            else:  # another worker builds it: keep the counters in step
                p.plans.language_steps += modality == "text"
