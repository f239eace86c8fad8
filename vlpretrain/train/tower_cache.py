"""Reuse a frozen vision tower's outputs for images it has already encoded (``train.frozen_tower_cache_mb``).

A frozen tower (no trainable parameter; SAM in every paper stage, both towers in stages 1 and 2) is a fixed
function of its input image: a run that sees an image again (the demo's SFT stage draws each image ~6 times;
multi-epoch SFT at any scale) can reuse its output. The cache keys each image by a hash of its pixels (so no
data-path bookkeeping, and an image that differs in one pixel is a new entry), per tower and train/eval mode,
and stores outputs on the tower's device until the budget is full; later images are computed as before. A
tower with a trainable parameter is never cached, so the gradients and updates are those of the uncached run;
the forward values differ from it only in rounding (a cached output was computed in another batch).

Under FSDP every dp rank must run each tower's forward once per call (it all-gathers the tower's parameters):
a rank whose images all hit still runs the tower on one of them. Install after the weights are loaded
(``install``); the trainer does, since frozen weights never change afterwards. On a GPU the key costs a copy of
the pixels to the host (hashed there): worth it where images repeat and the towers cost more than that copy.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule


class FrozenTowerCache:
    """``run_tower(tower, images)`` for ``HybridVisionEncoder``: cached for the frozen towers given."""

    def __init__(self, towers: dict[str, nn.Module], budget_mb: float):
        self.names = {id(t): name for name, t in towers.items()}
        self.budget = int(budget_mb * 2**20)
        self.store: dict[tuple, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __call__(self, tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
        name = self.names.get(id(tower))
        if name is None or images.shape[0] == 0:
            return tower(images)
        keys = [(name, tower.training, tuple(images.shape[1:]), images.dtype, _digest(img))
                for img in images.detach().cpu()]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        run = missing or ([0] if isinstance(tower, FSDPModule) else [])
        computed = tower(images[run]).detach() if run else None
        like = computed[0] if computed is not None else self.store[keys[0]]
        out = like.new_empty((len(keys), *like.shape))
        for j, i in enumerate(run):
            out[i] = computed[j]
        for i in missing:
            if keys[i] not in self.store and self.bytes + _size(out[i]) <= self.budget:
                self.store[keys[i]] = out[i].clone()
                self.bytes += _size(out[i])
        hit = set(range(len(keys))).difference(missing)
        for i in hit:
            out[i] = self.store[keys[i]]
        return out

    def stats(self) -> dict:
        seen = self.hits + self.misses
        return {"images": len(self.store), "mb": round(self.bytes / 2**20, 1),
                "hit_rate": round(self.hits / seen, 4) if seen else 0.0}


def _digest(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def install(modules: list[nn.Module], budget_mb: float) -> FrozenTowerCache | None:
    """Cache the frozen towers of the first-stage part among ``modules`` (a pipeline rank's stages); None where
    the budget is 0, this rank has no vision encoder or every tower learns."""
    if budget_mb <= 0:
        return None
    for m in modules:
        embed = getattr(m, "embed", None)
        if embed is None:
            continue
        vision = embed.vision
        towers = {name: t for name, t in (("siglip", vision.siglip), ("sam", vision.sam))
                  if t is not None and not any(p.requires_grad for p in t.parameters())}
        if not towers:
            return None
        vision.run_tower = FrozenTowerCache(towers, budget_mb)
        return vision.run_tower
    return None
