"""From sources to fixed-shape global steps: one modality per step, layout-independent, resumable.

Every rank plans the whole global step with the same deterministic ``StepPlanner`` (``step_plan.py``), from
per-sample SIZES only (``sizes.py``: tokens, supervised labels, images, or why the sample is bad): which
samples, in which order, in which packed row, which draws are skipped. So the global sample sequence, the loss
denominator and the sample digest are the same for any dp size and worker count, and planning never reads
text. Each rank then reads, tokenises and collates only its own share of the rows (which rank and microbatch
trains each row: ``placement.py``, ``data.balance``; a function of the plan, so equal on every rank and on
resume), and decodes images only
if it runs the vision encoder, and then only its TP rank's share of each microbatch's images
(``image_split``). The cost per rank is O(global samples) of cheap, mostly vectorised arithmetic for the plan
plus O(global step / dp) of real data work.

Bad samples, without breaking that determinism:

* unusable text (corrupt JSON, no text, placeholder/image mismatch, nothing supervised, out-of-vocabulary
  corpus ids) is recorded as bad when the size index is built, and "longer than seq_len" follows from the
  size: every rank skips the same draws; the slot takes the source's next draw; counted per source, warned once;
* an undecodable image is seen only by the rank that decodes it: it is replaced by a blank image (the sample's
  text still trains) and counted in ``bad_images``; so is one over ``data.max_image_pixels`` that its format
  cannot decode at reduced size (a JPEG can: decoded at 1/2..1/8 size). Pillow's warnings while decoding
  (``DecompressionBombWarning``, ...) are logged once per source and kind, not printed at every draw;
* a sample that is good in the size index but cannot be read, or reads differently, when its rank collates it
  (the file changed after it was indexed) keeps its planned place: its span holds its image placeholders
  (blank images) and padding, with no label; counted in ``bad_reads`` on that rank. The loss denominator
  (from the plan) still counts its labels: a rare, bounded under-weighting of that step, never a hang.

A source with no usable sample among its first draws fails at start-up.

A worker that dies (the kernel's OOM killer, a crash) ends the run: ``worker_death`` turns torch's error into
which worker, which pid and which signal, for the trainer's one-line message.
"""
from __future__ import annotations

import logging
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vlpretrain.config import Config
from vlpretrain.data.encoding import IGNORE, EncodedSample, SampleEncoder, count_labels
from vlpretrain.data.placement import RowCost, microbatch_width, place, width_multiple
from vlpretrain.data.preprocess import decoding, resize_and_pad
from vlpretrain.data.shards import BadSample
from vlpretrain.data.sources import Source
from vlpretrain.data.step_plan import MAX_CONSECUTIVE_BAD, Slot, StepPlan, StepPlanner  # noqa: F401 (re-exported)
from vlpretrain.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)
_READ_ERRORS = (ValueError, KeyError, TypeError, OSError)


def resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def image_share(n_images: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """[start, end) of TP rank ``tp_rank``'s images among a microbatch's ``n_images`` (torch.chunk bounds): the
    same as ``vlpretrain.parallel.vision_split.image_share`` (the engine's), repeated here so that the data layer
    does not import the parallel one; a test checks that they agree."""
    size = -(-n_images // tp) if n_images else 0
    start = min(tp_rank * size, n_images)
    return start, min(start + size, n_images)


@dataclass
class Microbatch:
    tokens: torch.Tensor  # (B, S) long
    labels: torch.Tensor  # (B, S) long, IGNORE where not supervised
    # (B, M, 3, H, W) uint8 (padded, resized; the engine scales to [0, 1] on the device: 4x less to move), or
    # float in [0, 1]; None on text steps and on ranks that do not run the vision encoder. With the TP image
    # split, images outside this TP rank's share are left zero (not decoded).
    images: torch.Tensor | None
    positions: torch.Tensor | None = None  # (B, S) long, packed rows only (restart at each document)
    doc_ids: torch.Tensor | None = None  # (B, S) long, packed rows only (document-causal attention)


@dataclass
class LocalPlan:
    """What one dp rank builds: its rows' samples and the step's totals (small: what a worker receives)."""
    step: int
    modality: str
    rows: list[list[Slot]]
    totals: dict
    balance: dict = field(default_factory=dict)  # the placement's predicted imbalance (GlobalBatch fields)


@dataclass
class GlobalBatch:
    step: int
    modality: str  # "text" | "multimodal" | "mixed"
    microbatches: list[Microbatch]  # this dp rank's share
    num_label_tokens: int  # supervised tokens in the whole global batch (the loss denominator)
    num_tokens: int  # non-pad input tokens in the whole global batch
    num_images: int
    num_samples: int  # documents in the global step (= sequences unless packed)
    language_ratio_target: float | None  # None: the run groups no modalities, so no schedule applies
    language_ratio_realized: float
    samples_digest: str  # hash of the ordered sample keys of the global step: equal across layouts
    source_counts: dict[str, int] = field(default_factory=dict)
    bad_samples: dict[str, int] = field(default_factory=dict)  # skipped while planning this step (global)
    bad_images: int = 0  # images this rank could not decode (replaced by blanks)
    data_state: dict = field(default_factory=dict)  # planner state after this step (for checkpoints)
    bad_reads: int = 0  # planned samples this rank could not read as sized (masked, see the module doc)
    samples: list[list[tuple[int, int]]] = field(default_factory=list)  # (source, index) of each row, as built
    # predicted step / mean dp-rank cost of the step as placed (data.balance) and as contiguous shares
    rank_cost_imbalance: float = 1.0
    rank_cost_imbalance_contiguous: float = 1.0

    def pin_memory(self) -> GlobalBatch:
        """Page-locked host tensors for asynchronous host-to-GPU copies (called by the DataLoader)."""
        for mb in self.microbatches:
            for name in ("tokens", "labels", "images", "positions", "doc_ids"):
                t = getattr(mb, name)
                if t is not None:
                    setattr(mb, name, t.pin_memory())
        return self


class DataPipeline:
    """This rank's iterator of ``GlobalBatch``es (steps 1, 2, ... or from a restored state).

    ``load_images``: this rank runs the vision encoder (else no image tensors at all). ``image_split``:
    ``(tp_rank, tp)``: decode only this TP rank's share of every microbatch's images (``image_share``), the
    rest stay zero; ``(0, 1)`` decodes them all (``parallel.vision_split: replicate``, or tp = 1).
    ``row_cost``: the cost weights of ``data.balance: rows`` (``placement.py``); training passes the FLOP
    model's (``parallel.pipeline_cost.row_cost``); default: images only."""

    def __init__(self, cfg: Config, tokenizer: TextTokenizer, dp_rank: int = 0, dp_size: int = 1,
                 load_images: bool = True, state: dict | None = None, image_split: tuple[int, int] = (0, 1),
                 row_cost: RowCost | None = None):
        self.cfg, self.tok = cfg, tokenizer
        self.dp_rank, self.dp_size, self.load_images = dp_rank, dp_size, load_images
        self.image_split = image_split
        # microbatch widths follow data.trim_padding in the cost model as in ``_collate``
        self.row_cost = replace(row_cost or RowCost(), width_multiple=width_multiple(cfg))
        self.plans = StepPlanner(cfg, tokenizer)  # opens every source now: bad paths fail at start-up
        self.resume_notes: list[str] = []  # how a restored state met a changed data configuration (one line each)
        if state is not None:
            self.resume_notes = self.load_state_dict(state)
        m = cfg.model
        self.encoder = SampleEncoder(tokenizer, m.image_tokens, cfg.train.seq_len, cfg.data.system_prompt,
                                     truncate=False, vocab_size=m.vocab_size)
        self.image_size = m.image_size
        self.pad_mean = m.sam.mean if m.sam.enabled else m.siglip.mean
        self._warned_images: set[str] = set()  # sources whose blank-image warning was given
        self._warned_reads: set[str] = set()
        self._warned_decode: set[tuple[str, str]] = set()  # (source, kind) of image-decoding notes given
        # called in a worker with the step number before it builds that step (the trainer's fault injection)
        self.before_build: Callable[[int], None] | None = None
        self._loader_iter = None  # the DataLoader's iterator (its workers), with data.num_workers > 0

    @property
    def sources(self) -> list[Source]:
        return self.plans.sources

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.plans.sources]

    def describe(self, source: int, index: int) -> dict:
        """A sample as a user can find it (``StepPlanner.describe``)."""
        return self.plans.describe(source, index)

    def state_dict(self) -> dict:
        return self.plans.state_dict()

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from a saved state; returns one line per data-configuration change it applied (the rules:
        ``plan_state.py``), for the caller to print once (rank 0)."""
        return self.plans.load_state_dict(state)

    def exclude(self, samples) -> int:
        """``StepPlanner.exclude``: these (source position, sample index) pairs are never drawn from the next
        planned step on; returns how many were new."""
        return self.plans.exclude(samples)

    def local(self, plan: StepPlan) -> LocalPlan:
        """This dp rank's share of the step's rows, in microbatch order (``data.balance``, ``placement.py``)."""
        at = place(plan, self.dp_size, self.cfg.train.micro_batch_size, self.row_cost, self.cfg.data.balance,
                   pipelined=self.cfg.parallel.pp > 1)
        mine = [plan.rows[i] for i in at.rows[self.dp_rank]]
        balance = {"rank_cost_imbalance": at.imbalance, "rank_cost_imbalance_contiguous": at.imbalance_contiguous}
        return LocalPlan(plan.step, plan.modality, plan.slots_of(mine), plan.totals, balance)

    # ---- building this rank's share of one step

    def _read(self, s: Slot, counter: list[int]) -> tuple[EncodedSample, dict] | None:
        """The sample's encoding and record, or None if it no longer reads as it was sized (counted)."""
        src = self.sources[s.source]
        try:
            toks = src.tokens(s.index)
            if toks is not None:
                sample, record = self.encoder.encode_tokens(toks), {"images": []}
            else:
                record = src.record(s.index)
                sample = self.encoder.encode(record)
            got = (len(sample.tokens), count_labels(sample.labels), len(sample.images))
            if got != (s.tokens, s.labels, s.images):
                raise ValueError(f"reads as {got[0]} tokens, {got[1]} labels, {got[2]} images; its size index "
                                 f"says {s.tokens}, {s.labels}, {s.images} (changed since it was indexed?)")
            return sample, record
        except _READ_ERRORS as e:
            counter[1] += 1
            if src.name not in self._warned_reads:
                self._warned_reads.add(src.name)
                log.warning("masking planned sample %s of source %s: %s (further ones are only counted)",
                            src.key(s.index), src.name, e)
            return None

    def _image(self, s: Slot, j: int, record: dict, counter: list[int]) -> torch.Tensor:
        src = self.sources[s.source]
        with decoding(self.cfg.data.max_image_pixels) as notes:
            try:
                img = src.image(s.index, j, record)
            except (BadSample, OSError, ValueError, KeyError) as e:
                counter[0] += 1
                if src.name not in self._warned_images:  # once per source: the metrics count the rest
                    self._warned_images.add(src.name)
                    log.warning("blank image for %s (image %d): %s (further ones in source %s are only counted)",
                                src.key(s.index), j, e, src.name)
                img = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        for kind, message in notes:  # Pillow's warnings, reduced-size decodes: once per source and kind
            if (src.name, kind) not in self._warned_decode:
                self._warned_decode.add((src.name, kind))
                log.warning("image %d of %s: %s (further %s notes in source %s are not repeated)",
                            j, src.key(s.index), message, kind, src.name)
        return resize_and_pad(img, self.image_size, self.pad_mean)

    def _width(self, rows: list[list[Slot]]) -> int:
        """A microbatch's columns: seq_len, or (``data.trim_padding``, no pipeline) its longest row rounded up
        (``placement.microbatch_width``). Trailing padding changes no loss: causal attention never looks ahead
        and padding carries no label."""
        longest = max((sum(s.tokens for s in row) for row in rows), default=0)
        return microbatch_width(longest, self.cfg.train.seq_len, self.row_cost.width_multiple)

    def _collate(self, rows: list[list[Slot]], modality: str, counter: list[int]) -> Microbatch:
        seq, b = self._width(rows), len(rows)
        packed = self.cfg.data.packing
        # filled as numpy arrays (a slice assignment from a list or array is one C loop; a torch tensor per
        # sample costs more than the copy), handed to torch without a copy at the end
        tokens = np.full((b, seq), self.tok.pad_id, dtype=np.int64)
        labels = np.full((b, seq), IGNORE, dtype=np.int64)
        positions = np.zeros((b, seq), dtype=np.int64) if packed else None
        doc_ids = np.zeros((b, seq), dtype=np.int64) if packed else None
        per_row = [sum(s.images for s in row) for row in rows]
        # image steps give every microbatch an image tensor (possibly with no image) so that all ranks run
        # the vision towers; text steps give None and skip them
        images = None
        if self.load_images and modality != "text":
            images = torch.zeros(b, max(per_row), 3, self.image_size, self.image_size, dtype=torch.uint8)
        lo, hi = image_share(sum(per_row), self.image_split[1], self.image_split[0])
        k = 0  # image number in the microbatch, in placeholder order (row by row): the engine's order
        for r, row in enumerate(rows):
            pos, slot = 0, 0
            for d, s in enumerate(row, start=1):
                got = self._read(s, counter)
                n = s.tokens
                if got is not None:
                    tokens[r, pos:pos + n] = got[0].tokens
                    labels[r, pos:pos + n] = got[0].labels
                else:  # keep the planned layout (image placeholders, so every image count agrees), no label
                    tokens[r, pos:pos + s.images * self.encoder.image_tokens] = self.tok.image_id
                if packed:
                    positions[r, pos:pos + n] = np.arange(n)
                    doc_ids[r, pos:pos + n] = d
                if images is not None and got is not None:
                    for j in range(s.images):
                        if lo <= k + j < hi:
                            images[r, slot + j] = self._image(s, j, got[1], counter)
                k, slot, pos = k + s.images, slot + s.images, pos + n
        if not self.cfg.data.document_causal:  # plain concatenation: no position reset, full causal attention
            positions = doc_ids = None

        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a)
        return Microbatch(tensor(tokens), tensor(labels), images, tensor(positions), tensor(doc_ids))

    def build(self, plan: StepPlan | LocalPlan) -> GlobalBatch:
        """This rank's microbatches of a planned step (only its rows are read)."""
        local = self.local(plan) if isinstance(plan, StepPlan) else plan
        mbs, counter = self.cfg.train.micro_batch_size, [0, 0]
        micro = [self._collate(local.rows[i:i + mbs], local.modality, counter)
                 for i in range(0, len(local.rows), mbs)]
        return GlobalBatch(step=local.step, modality=local.modality, microbatches=micro, bad_images=counter[0],
                           bad_reads=counter[1], samples=[[(s.source, s.index) for s in row] for row in local.rows],
                           **local.totals, **local.balance)

    def __iter__(self):
        return self

    def __next__(self) -> GlobalBatch:
        return self.build(self.plans.plan())

    def steps(self, pin_memory: bool = False):
        """Iterator over the coming steps; with ``data.num_workers`` > 0 this process plans (sizes only) and
        worker processes build whole steps ahead, each its own steps and only this rank's rows of them; pinned
        for fast copies to the GPU when ``pin_memory``."""
        if self.cfg.data.num_workers == 0:
            return (b.pin_memory() for b in self) if pin_memory else iter(self)
        loader = torch.utils.data.DataLoader(
            _Builder(self), sampler=_Plans(self), batch_size=None, num_workers=self.cfg.data.num_workers,
            prefetch_factor=self.cfg.data.prefetch_steps, collate_fn=_identity, pin_memory=pin_memory)
        self._loader_iter = iter(loader)
        return self._loader_iter

    def worker_death(self, exc: BaseException) -> WorkerDeath | None:
        """What torch's "DataLoader worker (pid N) is killed by signal: Killed" (or "... exited unexpectedly")
        error ``exc`` says, with the worker's number; None for any other error."""
        m = _WORKER_DIED.search(str(exc))
        if m is None:
            return None
        pids = [int(p) for p in re.findall(r"\d+", m.group(1))]
        workers = list(getattr(self._loader_iter, "_workers", []))  # torch's, by worker id
        for i, w in enumerate(workers):
            if w.pid in pids:
                return WorkerDeath(i, w.pid, _signal_name(w.exitcode, m.group(2)))
        return WorkerDeath(None, pids[0] if pids else None, _signal_name(None, m.group(2)))

    def skipped(self) -> dict[str, int]:
        return dict(self.plans.bad_total)


_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited)")


@dataclass
class WorkerDeath:
    worker: int | None  # the worker's number (None: not found among the loader's workers)
    pid: int | None
    signal: str  # "SIGKILL", "SIGSEGV", ... or "exit code N" / "unknown"


def _signal_name(exitcode: int | None, description: str | None) -> str:
    """A signal's name from a process's exit code (-N) or from its description ("Killed", as strsignal says)."""
    if exitcode is not None and exitcode < 0:
        return signal.Signals(-exitcode).name
    for sig in signal.Signals:
        if description and signal.strsignal(sig) == description.strip():
            return sig.name
    return f"exit code {exitcode}" if exitcode is not None else (description or "unknown")


def _identity(x):
    return x


class _Plans(torch.utils.data.Sampler):
    """Runs in the training process: the plan of every step, this rank's part of it handed to a worker."""

    def __init__(self, pipeline: DataPipeline):
        self.pipeline = pipeline

    def __iter__(self):
        p = self.pipeline
        while True:
            yield p.local(p.plans.plan())


class _Builder(torch.utils.data.Dataset):
    """Runs in a worker: builds the step it is handed."""

    def __init__(self, pipeline: DataPipeline):
        self.pipeline = pipeline

    def __getitem__(self, plan: LocalPlan) -> GlobalBatch:
        if self.pipeline.before_build is not None:
            self.pipeline.before_build(plan.step)
        return self.pipeline.build(plan)
