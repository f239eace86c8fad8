"""The step types a run will see, for the pipeline partitioner: which share of the steps is text-only and how
many images the first stage encodes per microbatch in the others.

With modality grouping (``data.group_by_modality``) a step is all-text or all-multimodal, in the proportion
``data.language_ratio`` reaches after its warm-up (``end``: the warm-up is short next to the run); without
grouping every step mixes both. The images per microbatch of a packed multimodal row depend on the data, so
``measured_mix`` samples the run's own step planner (a few dozen planned steps of a reduced batch: the sample
sequence, hence the images per row, does not depend on the batch size); ``assumed_mix`` is the stand-in when
the data cannot be read (and the one ``layer_split: auto`` uses at start-up, see ``mesh.resolve_layout``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from vlpretrain.config import Config
from vlpretrain.errors import UserError


@dataclass(frozen=True)
class StepType:
    name: str  # "text", "multimodal" or "mixed"
    share: float  # fraction of the run's steps
    images: tuple[int, ...] = ()  # images per microbatch, one entry per observed microbatch; () = text only
    note: str = ""  # where the numbers come from (one line for ``plan``)

    @property
    def mean_images(self) -> float:
        return sum(self.images) / len(self.images) if self.images else 0.0


def _modality_weights(cfg: Config) -> tuple[float, float] | None:
    """(text weight, multimodal weight) of the configured sources, or None when they cannot be read."""
    from vlpretrain.data.manifest import load_manifest

    try:
        sources = load_manifest(cfg.data).sources
    except (OSError, UserError, ValueError):
        return None
    text = sum(s.weight for s in sources if s.modality == "text")
    mm = sum(s.weight for s in sources if s.modality != "text")
    return (text, mm) if text + mm > 0 else None


def language_share(cfg: Config) -> float:
    """Share of text-only steps after the warm-up: ``language_ratio.end`` when both modalities are configured,
    0 or 1 when only one is."""
    w = _modality_weights(cfg)
    if w is not None and (w[0] == 0 or w[1] == 0):
        return 1.0 if w[1] == 0 else 0.0
    return cfg.data.language_ratio.end


def assumed_mix(cfg: Config, images_per_sample: float = 1.0) -> list[StepType]:
    """The step types without reading the data: every multimodal sample (or packed row) carries
    ``images_per_sample`` images. Grouped: text steps with the language share, multimodal steps with the rest.
    Mixed: the multimodal share of the samples is 1 - the language share (mixed steps draw language samples at
    ``language_ratio``, as grouped runs draw language steps)."""
    b = cfg.train.micro_batch_size
    per_mb = b * images_per_sample
    note = f"assumed: {images_per_sample:g} image(s) per multimodal {'row' if cfg.data.packing else 'sample'}"
    if cfg.data.group_by_modality:
        lang = language_share(cfg)
        out = []
        if lang > 0:
            out.append(StepType("text", lang, (), note))
        if lang < 1:
            out.append(StepType("multimodal", 1 - lang, (_whole(per_mb),), note))
        return out
    return [StepType("mixed", 1.0, (_whole(per_mb * (1 - language_share(cfg))),), note)]


def _whole(x: float):
    return int(x) if float(x).is_integer() else x


def measured_mix(cfg: Config, steps: int = 24, max_rows: int = 64) -> list[StepType]:
    """Step types from the data: plan ``steps`` steps of each kind with the run's own planner (batch reduced to
    at most ``max_rows`` sequences, the step's modality forced) and count the images per microbatch. Raises
    (UserError, OSError, ValueError) when the data cannot be read."""
    from vlpretrain.data.loader import StepPlanner, resolve
    from vlpretrain.data.tokenizer import TextTokenizer

    b = cfg.train.micro_batch_size
    rows = max(b, min(cfg.train.global_batch_size, max_rows) // b * b)
    tok = TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer))

    def sample(end: float) -> tuple[int, ...]:
        c = copy.deepcopy(cfg)
        c.train.global_batch_size = rows
        c.data.language_ratio.start = c.data.language_ratio.end = end
        c.data.language_ratio.warmup_steps = 0
        planner = StepPlanner(c, tok)
        counts: list[int] = []
        for _ in range(steps):  # the plan's rows (packed: first fit) from sample sizes: images per row
            plan = planner.plan()
            per_row = [sum(plan.slots[i].images for i in row) for row in plan.rows]
            counts += [sum(per_row[i:i + b]) for i in range(0, len(per_row), b)]
        return tuple(counts)

    what = f"measured: {steps} planned steps of {rows} {'packed rows' if cfg.data.packing else 'sequences'}"
    if not cfg.data.group_by_modality:
        return [StepType("mixed", 1.0, sample(cfg.data.language_ratio.end), what)]
    lang = language_share(cfg)
    out = []
    if lang > 0:
        out.append(StepType("text", lang, (), what))
    if lang < 1:
        out.append(StepType("multimodal", 1 - lang, sample(0.0), what))
    return out
