"""The one table of pipeline schedules, and the pipeline-layout arithmetic every layer shares.

A schedule is named in ``parallel.schedule``; the table says which ``torch.distributed.pipelining`` class runs
it, how virtual stages are placed on ranks, how many virtual stages per rank it takes and how large its
fill/drain bubble is. Config checks (``config.validate``), the layout (``mesh.resolve_layout``), the
partitioner and the predictor (``pipeline_split``, ``pipeline_cost``) and the runtime
(``pipeline.stages_of_rank``) all read it, so the placement the partitioner plans is the placement that runs.

Placements (V = pp x vpp virtual stages):

* ``single``: one stage per rank (vpp = 1), stage r on rank r;
* ``loop``: rank r holds r, r + pp, r + 2 pp, ... (Megatron's interleaving, vpp >= 2);
* ``v``: rank r holds r and 2 pp - 1 - r (ZB-V / DualPipeV, vpp = 2): the first and the last stage share
  rank 0.

No torch import here (the config rules read this table); the torch classes are looked up by name at run time.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    name: str
    torch_class: str  # attribute of torch.distributed.pipelining.schedules
    placement: str  # "single" | "loop" | "v" (module docstring)
    bubble: float  # fill + drain = bubble x (pp - 1) x the slowest virtual stage (ZB-H1: B, W ~1/3 each)


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (
    Schedule("1f1b", "Schedule1F1B", "single", 1.0),
    Schedule("gpipe", "ScheduleGPipe", "single", 1.0),
    Schedule("interleaved_1f1b", "ScheduleInterleaved1F1B", "loop", 1.0),
    Schedule("zero_bubble", "ScheduleInterleavedZeroBubble", "loop", 1 / 3),
    Schedule("zbv", "ScheduleZBVZeroBubble", "v", 1.0),
    Schedule("dualpipev", "ScheduleDualPipeV", "v", 1.0),  # torch >= 2.8
)}


def schedule_info(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r} (one of {', '.join(SCHEDULES)})")
    return SCHEDULES[name]


def placement_rank(k: int, pp: int, placement: str) -> int:
    """The pipeline rank of virtual stage ``k`` under a placement ("single", "loop" or "v")."""
    chunk, pos = divmod(k, pp)
    if placement == "v" and chunk % 2 == 1:
        return pp - 1 - pos
    return pos


def rank_of_stage(k: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs virtual stage ``k`` under ``schedule``."""
    return placement_rank(k, pp, schedule_info(schedule).placement)


def stages_of_rank(pp_rank: int, pp: int, vpp: int, schedule: str) -> list[int]:
    """The virtual stages of ``pp_rank``, in increasing order (the inverse of ``rank_of_stage``)."""
    return [k for k in range(pp * vpp) if rank_of_stage(k, pp, schedule) == pp_rank]


def schedule_problem(schedule: str, pp: int, vpp: int) -> tuple[str, str] | None:
    """(config key, message) when ``vpp`` does not fit ``schedule``'s placement; None when it does."""
    if pp == 1:
        return None if vpp == 1 else ("parallel.vpp", f"{vpp} virtual stages need pipeline parallelism "
                                                       f"(parallel.pp > 1)")
    placement = schedule_info(schedule).placement
    if placement == "single" and vpp != 1:
        return "parallel.schedule", f"{schedule} runs one stage per rank; use interleaved_1f1b for vpp={vpp}"
    if placement == "loop" and vpp < 2:
        return "parallel.schedule", f"{schedule} needs parallel.vpp >= 2"
    if placement == "v" and vpp != 2:
        return "parallel.schedule", f"{schedule} is V-shaped: it needs exactly parallel.vpp=2"
    return None


def microbatch_problem(global_batch: int, micro_batch: int, dp: int, pp: int, vpp: int,
                       schedule: str) -> tuple[str, str] | None:
    """(config key, message) when the global batch does not make a whole number of microbatches per pipeline,
    or too few, or (interleaved) not a multiple of pp; None when it is fine."""
    per = micro_batch * dp
    if global_batch % per:
        return "train.global_batch_size", (f"{global_batch} is not divisible by micro_batch_size x dp = "
                                           f"{micro_batch} x {dp}")
    n_mb = global_batch // per
    if pp > 1 and n_mb < pp:
        return "train.global_batch_size", (f"{n_mb} microbatches per step (global batch / (micro batch x dp)) "
                                           f"cannot fill {pp} pipeline ranks: need at least {pp}")
    if pp > 1 and vpp > 1 and n_mb % pp:
        return "train.global_batch_size", (f"{schedule} needs the microbatch count ({n_mb}) to be a multiple "
                                           f"of pp={pp}")
    return None


def dp_shard_problem(dp_shard: int, dp: int) -> tuple[str, str] | None:
    """(config key, message) when ``parallel.dp_shard`` (FSDP2's shard group size under HSDP; 0: all of dp)
    cannot split the dp ranks into equal shard groups; None when it is fine."""
    if dp_shard < 0:
        return "parallel.dp_shard", f"must be >= 1, or 0 for all of dp; got {dp_shard}"
    if dp_shard and dp % dp_shard:
        return "parallel.dp_shard", (f"{dp_shard} does not divide dp={dp}: dp = replicas x shard group size "
                                     "(0: shard over all of dp)")
    return None


def split_problem(split: list, n_layers: int, n_stages: int) -> str | None:
    """Why ``split`` (decoder layers per virtual stage) is not a valid layout, or None: one entry per virtual
    stage, integers >= 0 summing to the layers, and no empty stage (a 0 only where the stage still holds the
    embedding, stage 0, or the head, the last stage)."""
    if len(split) != n_stages:
        return f"has {len(split)} entries, pp x vpp = {n_stages} virtual stages"
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in split):
        return f"layer counts must be integers >= 0, got {split}"
    if sum(split) != n_layers:
        return f"sums to {sum(split)}, model has {n_layers} layers"
    for k, c in enumerate(split):
        if c == 0 and 0 < k < n_stages - 1:
            return f"virtual stage {k} has no layer and holds neither embed nor head (split {split})"
    return None

def theoretical_bubble(schedule: str, pp: int, vpp: int, m: int) -> float:
    """Idle share of a pipeline step in the textbook model (equal stages, no communication cost):
    1F1B / GPipe (pp-1)/(m+pp-1); interleaved 1F1B (pp-1)/(vpp m+pp-1); zero-bubble (ZB-H1, F = I = W)
    (pp-1)/(3 vpp m+pp-1); ZB-V and DualPipeV are bubble-free once m >= 2 pp (F = I = W)."""
    if pp <= 1:
        return 0.0
    if schedule in ("1f1b", "gpipe"):
        return (pp - 1) / (m + pp - 1)
    if schedule == "interleaved_1f1b":
        return (pp - 1) / (vpp * m + pp - 1)
    if schedule == "zero_bubble":
        return (pp - 1) / (3 * vpp * m + pp - 1)
    if schedule in ("zbv", "dualpipev"):
        return 0.0 if m >= 2 * pp else (pp - 1) / (3 * vpp * m + pp - 1)
    return float("nan")
