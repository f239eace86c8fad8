"""From JSONL sources to fixed-shape global batches, one modality per global step.

Every sequence is padded to ``train.seq_len`` (pipeline stages need fixed shapes). Bad samples are skipped,
counted per source and warned about once; a source with no usable sample fails at start-up.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlpretrain.config import Config, ConfigError, SourceConfig
from vlpretrain.data.preprocess import load_image, preprocess_image
from vlpretrain.data.sampler import ModalitySchedule, SourceCursor, WeightedChooser
from vlpretrain.data.samples import IGNORE, EncodedSample, SampleEncoder
from vlpretrain.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class Source:
    cfg: SourceConfig
    root: Path
    records: list[dict]
    skipped: int = 0

    @property
    def name(self) -> str:
        return self.cfg.name or Path(self.cfg.path).stem


def resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def load_source(cfg: SourceConfig, root: str) -> Source:
    path = resolve(root, cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"data source '{cfg.name or cfg.path}': file not found: {path}")
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError
                records.append(rec)
            except ValueError:
                bad += 1
    if not records:
        raise ConfigError(f"data error: source '{cfg.name or cfg.path}': no readable sample in {path}")
    return Source(cfg, path.parent, records, skipped=bad)


@dataclass
class Microbatch:
    tokens: torch.Tensor  # (B, S) long
    labels: torch.Tensor  # (B, S) long, IGNORE where not supervised
    images: torch.Tensor | None  # (B, M, 3, H, W) float in [0, 1], or None for text-only


@dataclass
class GlobalBatch:
    step: int
    modality: str  # "text" | "multimodal" | "mixed"
    microbatches: list[Microbatch]  # this dp rank's share
    num_label_tokens: int  # supervised tokens in the whole global batch (the loss denominator)
    num_tokens: int  # non-pad input tokens in the whole global batch
    num_images: int
    language_ratio_target: float
    source_counts: dict[str, int] = field(default_factory=dict)


class StepBatches:
    """Iterator of ``GlobalBatch`` for steps 1, 2, ...: the simple single-host demo path."""

    def __init__(self, cfg: Config, tokenizer: TextTokenizer, dp_rank: int = 0, dp_size: int = 1,
                 load_images: bool = True):
        self.cfg = cfg
        self.tok = tokenizer
        self.encoder = SampleEncoder(tokenizer, cfg.model.image_tokens, cfg.train.seq_len, cfg.data.system_prompt)
        self.sources = [load_source(s, cfg.data.root) for s in cfg.data.sources]
        if not self.sources:
            raise ConfigError("config error: data.sources is empty")
        self.schedule = ModalitySchedule(cfg.data.language_ratio)
        self.cursors = [SourceCursor(len(s.records), seed=cfg.train.seed * 1000 + i) for i, s in enumerate(self.sources)]
        self.by_modality = {m: [i for i, s in enumerate(self.sources) if s.cfg.modality == m]
                            for m in ("text", "multimodal")}
        self.choosers = {m: WeightedChooser([self.sources[i].cfg.weight for i in idx])
                         for m, idx in self.by_modality.items() if idx}
        self.mixed = WeightedChooser([s.cfg.weight for s in self.sources])
        # every rank draws and encodes the whole global batch (cheap: token ids), so the loss denominator is
        # known without communication; it collates only its own dp slice, and loads images only if it runs
        # the first pipeline stage
        self.dp_rank, self.dp_size, self.load_images = dp_rank, dp_size, load_images
        self.step = 0
        m = cfg.model
        self.image_size = m.image_size
        self.pad_mean = m.sam.mean if m.sam.enabled else m.siglip.mean
        self._warned: set[str] = set()

    def _modality(self, step: int) -> str:
        if not self.cfg.data.group_by_modality:
            return "mixed"
        has_text, has_mm = bool(self.by_modality["text"]), bool(self.by_modality["multimodal"])
        if has_text and has_mm:
            return "text" if self.schedule.is_language(step) else "multimodal"
        return "text" if has_text else "multimodal"

    def _draw(self, modality: str) -> tuple[int, EncodedSample]:
        for _ in range(1000):
            if modality == "mixed":
                si = self.mixed.next()
            else:
                idx = self.by_modality[modality]
                si = idx[self.choosers[modality].next()]
            src = self.sources[si]
            rec = src.records[self.cursors[si].next()]
            try:
                enc = self.encoder.encode(rec)
                for p in enc.images:
                    if not resolve(str(src.root), p).is_file():
                        raise FileNotFoundError(f"missing image {p}")
                return si, enc
            except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
                src.skipped += 1
                if src.name not in self._warned:
                    self._warned.add(src.name)
                    log.warning("skipping bad sample in source %s (id %s): %s", src.name, rec.get("id"), e)
        raise RuntimeError(f"no usable sample in 1000 draws for modality {modality}")

    def _collate(self, items: list[tuple[int, EncodedSample]], modality: str) -> Microbatch:
        s = self.cfg.train.seq_len
        b = len(items)
        tokens = torch.full((b, s), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE, dtype=torch.long)
        # image steps give every microbatch an image tensor (possibly with no image) so that all ranks run
        # the vision towers; text steps give None and skip them
        images = None
        if self.load_images and modality != "text":
            max_images = max(len(e.images) for _, e in items)
            images = torch.zeros(b, max_images, 3, self.image_size, self.image_size)
        for row, (si, enc) in enumerate(items):
            tokens[row, :len(enc.tokens)] = torch.tensor(enc.tokens)
            labels[row, :len(enc.labels)] = torch.tensor(enc.labels)
            root = str(self.sources[si].root)
            for j, p in enumerate(enc.images if images is not None else []):
                images[row, j] = preprocess_image(load_image(resolve(root, p)), self.image_size, self.pad_mean)
        return Microbatch(tokens, labels, images)

    def __iter__(self):
        return self

    def __next__(self) -> GlobalBatch:
        self.step += 1
        step = self.step
        modality = self._modality(step)
        mbs = self.cfg.train.micro_batch_size
        items = [self._draw(modality) for _ in range(self.cfg.train.global_batch_size)]
        counts: dict[str, int] = {}
        for si, _ in items:
            counts[self.sources[si].name] = counts.get(self.sources[si].name, 0) + 1
        local = len(items) // self.dp_size
        mine = items[self.dp_rank * local:(self.dp_rank + 1) * local]
        micro = [self._collate(mine[i:i + mbs], modality) for i in range(0, len(mine), mbs)]
        return GlobalBatch(
            step=step, modality=modality, microbatches=micro,
            num_label_tokens=sum(sum(1 for x in e.labels if x != IGNORE) for _, e in items),
            num_tokens=sum(len(e.tokens) for _, e in items),
            num_images=sum(len(e.images) for _, e in items),
            language_ratio_target=self.schedule.ratio(step), source_counts=counts)

    def skipped(self) -> dict[str, int]:
        return {s.name: s.skipped for s in self.sources}
