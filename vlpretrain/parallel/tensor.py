"""Megatron-style tensor parallelism (with optional sequence parallelism) over the decoder, via DTensor.

The first stage (vision encoders + adaptor + text embedding) is NOT tensor-parallel: as in the paper it is
computed identically on every TP rank. With sequence parallelism its replicated output is handed to the
decoder as a local Shard(1) slice; backward all-gathers the gradient, so every TP rank gets the same full
gradient for the first stage and no extra all-reduce is needed.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tensor_parallel(stage: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard the decoder blocks and the output head of one pipeline stage in place."""
    sp = sequence_parallel
    plan: dict[str, object] = {}
    if getattr(stage, "embed", None) is not None and sp:
        plan["embed"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                            use_local_output=True)
    for name in stage.layers.keys():
        p = f"layers.{name}"
        plan[f"{p}.attention.wq"] = ColwiseParallel()
        plan[f"{p}.attention.wk"] = ColwiseParallel()
        plan[f"{p}.attention.wv"] = ColwiseParallel()
        plan[f"{p}.attention.wo"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
        plan[f"{p}.feed_forward.w1"] = ColwiseParallel()
        plan[f"{p}.feed_forward.w3"] = ColwiseParallel()
        plan[f"{p}.feed_forward.w2"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
        if sp:
            plan[f"{p}.attention_norm"] = SequenceParallel()
            plan[f"{p}.ffn_norm"] = SequenceParallel()
            # attention(x, positions, mask) and feed_forward(x) see the full sequence
            plan[f"{p}.attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                        desired_input_layouts=(Replicate(), None, None))
            plan[f"{p}.feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                           desired_input_layouts=(Replicate(),))
    if getattr(stage, "head", None) is not None:
        if sp:
            plan["head.norm"] = SequenceParallel()
        # vocab-parallel logits stay sharded (a DTensor) for loss_parallel: no rank holds the full vocabulary
        plan["head.output"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                              output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(stage, tp_mesh, plan)
