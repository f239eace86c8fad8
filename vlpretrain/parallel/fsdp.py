"""Data parallelism with FSDP2 (``fully_shard``) over the dp mesh dimension, plus activation checkpointing.

Each decoder block, each vision tower, the rest of the first stage and the head are their own FSDP units, so
parameters are gathered just in time. Frozen and trainable parameters may share a unit. FSDP averages
gradients over dp ranks; the engine scales each rank's loss by dp so that the average is the sum of the
ranks' shares of the global-mean loss.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# matmul-like ops whose outputs selective checkpointing keeps; everything else (norms, activations,
# elementwise) is recomputed in backward
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(stage: nn.Module, mode: str) -> None:
    """Wrap each decoder block: ``full`` recomputes the whole block, ``selective`` keeps matmul outputs."""
    if mode == "none":
        return
    for name, block in list(stage.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=_selective_context)
        stage.layers[name] = wrapped


def apply_fsdp(stage: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool,
               param_dtype: torch.dtype | None) -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mesh": dp_mesh, **({"mp_policy": mp} if mp else {})}
    embed = getattr(stage, "embed", None)
    if embed is not None:
        fully_shard(embed.vision.siglip, reshard_after_forward=reshard_after_forward, **kw)
        if embed.vision.sam is not None:
            fully_shard(embed.vision.sam, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(embed, reshard_after_forward=reshard_after_forward, **kw)
    for block in stage.layers.values():
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    if getattr(stage, "head", None) is not None:
        # the head's backward follows its forward at once: keep it gathered in between
        fully_shard(stage.head, reshard_after_forward=False, **kw)
    fully_shard(stage, reshard_after_forward=reshard_after_forward, **kw)


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
