"""Gather the full (unsharded) weights of every pipeline stage onto global rank 0, for a safetensors save."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vlpretrain.parallel.engine import ParallelModel
from vlpretrain.parallel.mesh import ParallelContext


def gather_full_state_dict(model: ParallelModel, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Collective over all ranks; the result is complete on global rank 0 only (empty elsewhere)."""
    opts = StateDictOptions(full_state_dict=True)
    local: dict[str, torch.Tensor] = {}
    for m in model.modules:  # unshards FSDP/TP parameters: every rank of the stage takes part
        local.update({k: v.cpu() for k, v in get_model_state_dict(m, options=opts).items()})
    if ctx.layout.pp == 1:
        return local if ctx.is_main else {}
    if ctx.dp_rank != 0 or ctx.tp_rank != 0:
        return {}
    # the pp group through global rank 0: one copy per stage is enough
    parts: list[dict] | None = [None] * ctx.layout.pp if ctx.pp_rank == 0 else None
    pp_group = ctx.submesh("pp").get_group()
    dist.gather_object(local, parts, dst=dist.get_global_rank(pp_group, 0), group=pp_group)
    if not ctx.is_main:
        return {}
    full: dict[str, torch.Tensor] = {}
    for p in parts:
        full.update(p)
    return full
