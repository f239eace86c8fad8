"""Split the first stage's images across the tensor-parallel group (beyond the paper, which recomputes them).

The vision towers and the adaptor are not tensor-parallel. Instead of encoding every image on every TP rank,
each rank encodes a contiguous share of a microbatch's N images (``torch.chunk`` bounds: balanced by count,
any N, including N < tp), and the adaptor outputs are all-gathered as a DTensor ``Shard(0) -> Replicate``
redistribution, so every rank splices the full sequence as before. The gradient reaching the spliced
embeddings is identical on every TP rank (the decoder's TP collectives make it so), and the backward of that
redistribution takes each rank's own slice of it: each rank back-propagates through its images only. The
gradients of trainable first-stage parameters are then partial sums, added over the TP group by
``reduce_first_stage_grads`` once per step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from vlpretrain.models.vlm import part_of

IMAGE_PARTS = ("siglip", "sam", "adaptor")  # parameters whose gradient depends on the images


def image_share(n_images: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """[start, end) of this TP rank's images among ``n_images`` (torch.chunk's bounds, as DTensor shards)."""
    size = -(-n_images // tp) if n_images else 0
    start = min(tp_rank * size, n_images)
    return start, min(start + size, n_images)


class SplitImageEncoder:
    """Wraps ``encode(pixels) -> (N, tokens, dim)``: this rank encodes its share, then all ranks gather.
    Not a module: it adds no parameters or names, it only routes the embedding's own ``encode_images``."""

    def __init__(self, encode, tp_mesh: DeviceMesh):
        self._encode = encode
        self.mesh = tp_mesh

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        start, end = image_share(n, self.mesh.size(), self.mesh.get_local_rank())
        if end > start:
            local = self._encode(pixels[start:end])
        else:  # fewer images than ranks: run the towers on a blank image weighted by zero, so every rank runs
            blank = self._encode(pixels.new_zeros(1, *pixels.shape[1:]))  # (and FSDP gathers) the same modules
            local = blank[:0] + 0.0 * blank.sum()
        shape = (n, *local.shape[1:])
        full = DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
        return full.redistribute(self.mesh, [Replicate()]).to_local()


def apply_vision_split(stage: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make the first stage's embedding encode only this TP rank's images (a no-op on other stages)."""
    embed = getattr(stage, "embed", None)
    if embed is not None:
        embed.image_encoder = SplitImageEncoder(embed.encode_images, tp_mesh)


def reduce_first_stage_grads(modules: list[nn.Module], tp_mesh: DeviceMesh) -> None:
    """Sum the image-dependent gradients of the first stage over the TP group (each rank saw its images)."""
    grads = [p.grad for m in modules for name, p in m.named_parameters()
             if p.grad is not None and name.startswith("embed.") and part_of(name) in IMAGE_PARTS]
    if not grads:
        return
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    flat = torch.cat([g.reshape(-1) for g in local])  # one collective for all of them
    dist.all_reduce(flat, group=tp_mesh.get_group())
    offset = 0
    for g in local:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
