"""Activation checkpointing of the decoder blocks: ``full`` recomputes each block in backward, ``selective``
keeps the outputs of matmul-like ops (and attention) and recomputes the cheap rest (norms, activations,
elementwise), trading a little compute for most of the activation memory. Applied per pipeline stage before
FSDP wraps the blocks (the checkpoint wrapper sits inside the FSDP unit)."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
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
