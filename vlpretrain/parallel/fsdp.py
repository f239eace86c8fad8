"""Data parallelism with FSDP2 (``fully_shard``) over the dp mesh dimension.

Each decoder block, each vision tower, the rest of the first stage and the head are their own FSDP units, so
parameters are gathered just in time. Frozen and trainable parameters may share a unit. FSDP averages
gradients over dp ranks; the engine scales each rank's loss by dp so that the average is the sum of the
ranks' shares of the global-mean loss.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(stage: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool | str,
               param_dtype: torch.dtype | None, keep_gathered_below_mb: float = 0.0) -> None:
    """FSDP2 units: each vision tower, the rest of the first stage, each decoder block, the head, the root.

    ``reshard_after_forward`` "auto": a unit whose own parameters (compute dtype) are below
    ``keep_gathered_below_mb`` keeps them gathered from its forward to its backward, and across the step's
    microbatches (``keep_gathered_between_microbatches``); larger units are freed after forward (ZeRO-3)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mesh": dp_mesh, **({"mp_policy": mp} if mp else {})}
    wrapped: set[int] = set()  # parameters already in a unit

    def shard(module: nn.Module, reshard: bool | str = reshard_after_forward) -> None:
        own = [p for p in module.parameters() if id(p) not in wrapped]
        if reshard == "auto":
            item = torch.finfo(param_dtype).bits // 8 if param_dtype is not None else None
            size = sum(p.numel() * (item or p.element_size()) for p in own)
            reshard = size >= keep_gathered_below_mb * 2**20
        fully_shard(module, reshard_after_forward=reshard, **kw)
        module._vlp_keep_gathered = not reshard  # (read by keep_gathered_between_microbatches)
        wrapped.update(id(p) for p in own)

    embed = getattr(stage, "embed", None)
    if embed is not None:
        shard(embed.vision.siglip)
        if embed.vision.sam is not None:
            shard(embed.vision.sam)
        shard(embed)
    for block in stage.layers.values():
        shard(block)
    if getattr(stage, "head", None) is not None:
        # the head's backward follows its forward at once: keep it gathered in between
        shard(stage.head, reshard=False)
    shard(stage)


def keep_gathered_between_microbatches(stage: nn.Module, last: bool) -> None:
    """Before a microbatch's backward: units that keep their parameters gathered after forward also keep them
    after backward, except after the step's last microbatch (then the optimizer sees the shards)."""
    for module in stage.modules():
        if isinstance(module, FSDPModule) and getattr(module, "_vlp_keep_gathered", False):
            module.set_reshard_after_backward(last, recurse=False)


def reshard_all(stage: nn.Module) -> None:
    """Free every gathered parameter (after forward-only work, which leaves kept-gathered units gathered)."""
    for module in stage.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def prepare_unsharded_params(stage: nn.Module) -> None:
    """Gather and free every FSDP unit's parameters once, so each has its unsharded parameter object.

    Under a mixed-precision policy, torch (2.11 - 2.14) fails at the end of a backward without gradient sync
    (gradient accumulation, pipeline microbatches) for a unit that never ran forward, e.g. the vision towers
    on an all-text step: it reads the unsharded parameter, which is only created by the first gather.
    """
    for module in stage.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()
