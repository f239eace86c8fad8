"""Full weights in and out of any layout without a full model copy on any rank.

In: ``load_local_`` copies into a parameter only the region of the full tensor this rank holds (its TP / FSDP
shard), read through a callback that slices the file (safetensors ``get_slice``), so a rank reads its share.
Out: ``write_full_weights`` has every rank write its own shards (one writer per replicated copy) straight into
one shared safetensors file at their offsets: nothing is gathered, so peak memory per rank is its share, all
ranks write in parallel, and the file equals ``save_file``'s.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from vlpretrain.checkpoint.safetensors_stream import StreamingSafetensors
from vlpretrain.parallel.mesh import ParallelContext

Region = tuple[slice, ...]


def local_region(t: torch.Tensor) -> Region | None:
    """The slices of the full tensor that this rank's shard of ``t`` holds; None for a plain (whole) tensor
    or a sharding that is not one box of the full tensor."""
    if not isinstance(t, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(t.to_local().shape):
        return None
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def load_local_(param: torch.Tensor, read: Callable[[Region | None], torch.Tensor]) -> None:
    """``param[...] = full value``, reading only this rank's region: ``read(region)`` returns the full tensor
    sliced by ``region`` (or whole for None). ``copy_`` casts to the parameter's dtype."""
    region = local_region(param)
    if region is not None:
        param.to_local().copy_(read(region))
    elif isinstance(param, DTensor):  # not a box (never with our layouts): whole tensor, sliced locally
        from vlpretrain.parallel.engine import copy_full_
        copy_full_(param, read(None))
    else:
        param.copy_(read(None))


def _specs(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _writes(t: torch.Tensor, ctx: ParallelContext) -> bool:
    """Whether this rank writes its copy of ``t``: of the ranks holding the same bytes (replicas along a dp/tp
    dim that ``t`` is not sharded on), the one at coordinate 0."""
    if not isinstance(t, DTensor):
        return ctx.dp_rank == 0 and ctx.tp_rank == 0
    names = t.device_mesh.mesh_dim_names or ()
    on_dp = bool({"dp", "dp_replicate", "dp_shard"} & set(names))  # (HSDP: the two dp dims, not "dp")
    if (not on_dp and ctx.dp_rank != 0) or ("tp" not in names and ctx.tp_rank != 0):
        return False
    return all(not p.is_replicate() or t.device_mesh.get_local_rank(i) == 0 for i, p in enumerate(t.placements))


def write_full_weights(modules: list, ctx: ParallelContext, path: Path,
                       metadata: dict[str, str] | None = None) -> Exception | None:
    """Collective over all ranks: the full weights of every stage into one safetensors file ``path``, each
    rank writing its own shards at their offsets (no gathering: peak memory is the rank's share). Returns this
    rank's write error (or the header's, shared by all) or None; every rank reaches the end either way, so a
    failing disk never hangs the job."""
    states = [get_model_state_dict(m) for m in modules]  # clean names; DTensor shards, not gathered
    first_of_stage = ctx.dp_rank == 0 and ctx.tp_rank == 0
    local = {k: v for s in states for k, v in _specs(s).items()} if first_of_stage else {}
    parts = [local]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    specs: dict = {}
    for p in parts:
        specs.update(p)
    out = StreamingSafetensors(path, specs, metadata)
    problem = None
    if ctx.is_main:
        try:
            out.create()
        except OSError as e:
            problem = e
    if dist.is_initialized():  # everyone waits for the header (and learns whether it could be written)
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, None if problem is None else (problem.errno, problem.strerror))
        if problem is None and any(problems):
            problem = OSError(*next(p for p in problems if p), str(path))
    fd = None
    try:
        if problem is None:
            fd = out.open()
            for state in states:
                for name, value in state.items():
                    if not _writes(value, ctx):
                        continue
                    region = local_region(value)
                    if region is None and isinstance(value, DTensor):
                        raise ValueError(f"{name}: its shard is not one box of the tensor ({value.placements})")
                    if region is None:
                        out.write(name, value, fd)
                    else:
                        out.write_region(name, value.to_local(), region, fd)
            os.fsync(fd)
    except (OSError, ValueError) as e:  # reported by every rank after the barrier, never a hang
        problem = e
    finally:
        if fd is not None:
            os.close(fd)
    if dist.is_initialized():  # the file is complete only when every rank is done
        dist.barrier()
    return problem
