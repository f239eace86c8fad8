"""Pipeline parallelism with ``torch.distributed.pipelining``: stages cut from the model's parts.

Virtual stage k holds a contiguous run of parts; stage 0 starts with ``embed`` (the heavy vision + embedding
part), the last ends with ``head``. A stage module is a copy of the whole (meta-device) model with the parts
it does not own removed, so parameter names are identical in every layout. Rank r owns virtual stages
r, r + pp, ... (looped schedules) or r and 2 pp - 1 - r (V-shaped schedules).
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as S

from vlpretrain import layout_rules

# name -> torch class (None where this torch lacks it), from the one schedule table (layout_rules.py)
SCHEDULES = {name: getattr(S, info.torch_class, None) for name, info in layout_rules.SCHEDULES.items()}


@dataclass(frozen=True)
class StageSpec:
    index: int
    has_embed: bool
    layers: tuple[int, ...]
    has_head: bool


def stage_specs(split: list[int]) -> list[StageSpec]:
    """Decoder-layer counts per virtual stage -> what each virtual stage holds."""
    specs, start = [], 0
    for k, n in enumerate(split):
        spec = StageSpec(k, k == 0, tuple(range(start, start + n)), k == len(split) - 1)
        if not (spec.has_embed or spec.layers or spec.has_head):
            raise ValueError(f"layout error: virtual stage {k} of split {split} holds no part")
        specs.append(spec)
        start += n
    return specs


def stages_of_rank(pp_rank: int, pp: int, vpp: int, schedule: str) -> list[int]:
    """Virtual stages of ``pp_rank``: the schedule table's placement (the one the partitioner plans)."""
    return layout_rules.stages_of_rank(pp_rank, pp, vpp, schedule)


def cut_stage(model: nn.Module, spec: StageSpec) -> nn.Module:
    """A copy of ``model`` (on the meta device) holding only the parts of ``spec``."""
    stage = copy.deepcopy(model)
    if not spec.has_embed:
        stage.embed = None
    if not spec.has_head:
        stage.head = None
    for name in list(stage.layers.keys()):
        if int(name) not in spec.layers:
            del stage.layers[name]
    return stage


class PackedStage(nn.Module):
    """Runs a stage on packed rows: the first stage takes tokens (+ images) with the rows' positions and
    document ids, and every stage but the last hands them on beside its hidden states, so each stage builds
    the same document-causal mask. Only the schedule sees this wrapper: checkpoints and initialisation use
    the stage itself, so parameter names do not change."""

    def __init__(self, stage: nn.Module, is_first: bool, is_last: bool):
        super().__init__()
        self.stage = stage
        self.is_first, self.is_last = is_first, is_last

    def forward(self, x, *rest, images=None, positions=None, doc_ids=None):
        if not self.is_first:
            positions, doc_ids = rest
        h = self.stage(x, images, positions, doc_ids)
        return h if self.is_last else (h, positions, doc_ids)


def build_schedule(stage_modules: list[nn.Module], stage_ids: list[int], n_stages: int, device: torch.device,
                   pp_group, schedule: str, n_microbatches: int, loss=None, wrap=None):
    """The pipeline schedule over this rank's stages. ``loss(output, target)``: the training loss (or, run
    forward only, the evaluation's row scores); ``wrap(module, is_first, is_last)``: what the schedule runs
    (e.g. ``PackedStage``), so that checkpoints and initialisation keep using the stage itself."""
    cls = SCHEDULES[schedule]
    if cls is None:
        raise RuntimeError(f"parallel.schedule={schedule} is not available in torch {torch.__version__}")
    if wrap is not None:
        stage_modules = [wrap(m, sid == 0, sid == n_stages - 1) for m, sid in zip(stage_modules, stage_ids)]
    pipe = [PipelineStage(m, sid, n_stages, device, group=pp_group) for m, sid in zip(stage_modules, stage_ids)]
    # the loss is a sum over tokens, normalised once after backward: the schedule must not rescale gradients
    if cls in (S.Schedule1F1B, S.ScheduleGPipe):
        return cls(pipe[0], n_microbatches, loss_fn=loss, scale_grads=False)
    return cls(pipe, n_microbatches, loss_fn=loss, scale_grads=False)


def run_microbatches(schedule, arg_mbs: list | None, kwarg_mbs: list | None, target_mbs: list | None = None,
                     losses: list | None = None, forward_only: bool = False) -> None:
    """One pipeline step over the microbatches the data path made. Newer torch takes them as they are
    (``step(arg_mbs=...)``; ``eval`` for forward only); older releases only split whole-batch inputs, so
    there they are joined first (images padded to a common count of slots per sample)."""
    if "arg_mbs" in inspect.signature(schedule.step).parameters:
        run = schedule.eval if forward_only else functools.partial(schedule.step, return_outputs=False)
        run(arg_mbs=arg_mbs, kwarg_mbs=kwarg_mbs, target_mbs=target_mbs, losses=losses)
        return
    args = tuple(torch.cat(parts) for parts in zip(*arg_mbs)) if arg_mbs else ()
    kwargs = {k: _cat_slots([kw[k] for kw in kwarg_mbs]) for k in kwarg_mbs[0]} if kwarg_mbs else {}
    target = torch.cat(target_mbs) if target_mbs else None
    if not forward_only:
        schedule.step(*args, target=target, losses=losses, **kwargs)
        return
    backward, schedule._has_backward = schedule._has_backward, False  # what newer torch's eval() does
    try:
        schedule.step(*args, target=target, losses=losses, **kwargs)
    finally:
        schedule._has_backward = backward


def _cat_slots(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch; image tensors (B, M, 3, H, W) are zero-padded to the largest M first."""
    if tensors[0].dim() == 5:
        m = max(t.shape[1] for t in tensors)
        tensors = [torch.cat([t, t.new_zeros(t.shape[0], m - t.shape[1], *t.shape[2:])], 1) for t in tensors]
    return torch.cat(tensors)
