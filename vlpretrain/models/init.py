"""Layout-independent initialisation: every parameter's initial value is a function of (seed, its name).

Each parameter draws from its own generator seeded by hashing the seed with its fully-qualified name, so a
pipeline stage, a tensor-parallel shard or the single-process model all start from exactly the same weights,
whatever the layout and whatever order parts are built in.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from vlpretrain.config import ModelConfig


def param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape[1:])) if len(shape) > 1 else shape[0]


def initial_value(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int,
                  fan_in: int | None = None) -> torch.Tensor:
    """The full (unsharded) fp32 initial value of parameter ``name``; ``fan_in`` is that of the weight a
    bias belongs to (PyTorch's default bias init depends on it)."""
    g = torch.Generator().manual_seed(param_seed(seed, name))
    t = torch.empty(shape)
    leaf = name.rsplit(".", 1)[-1]
    std = cfg.init_std
    if name.startswith("embed.vision."):
        return _vision_value(name, leaf, t, g, fan_in)
    if name.startswith("embed.adaptor."):
        return t.zero_() if leaf == "bias" else nn.init.trunc_normal_(t, std=std, generator=g)
    if name == "embed.tok_embeddings.weight":
        return nn.init.normal_(t, std=std, generator=g)
    if len(shape) == 1:  # RMSNorm weights
        return t.fill_(1.0)
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        # residual-branch outputs, scaled down with depth (GPT-2 / torchtitan practice)
        return nn.init.trunc_normal_(t, std=std / math.sqrt(2 * cfg.n_layers), generator=g)
    return nn.init.trunc_normal_(t, std=std, generator=g)


def _vision_value(name: str, leaf: str, t: torch.Tensor, g: torch.Generator, fan_in: int | None) -> torch.Tensor:
    """What timm builds: SigLIP (timm ViT) gets trunc-normal(0.02) Linear weights with zero biases and a
    trunc-normal(0.02) position embedding; SAM (timm ViTDet) keeps PyTorch's default Linear/Conv init with zero
    position embeddings; LayerNorms are 1/0; DeepSeek-VL's neck_hd gate starts at 0."""
    siglip = name.startswith("embed.vision.siglip.")
    if leaf == "pos_embed":
        return nn.init.trunc_normal_(t, std=0.02, generator=g) if siglip else t.zero_()
    if leaf in ("rel_pos_h", "rel_pos_w", "hd_alpha_downsamples"):
        return t.zero_()
    if t.dim() == 1 and (leaf == "weight" or fan_in is None):  # LayerNorm / LayerNorm2d
        return t.fill_(1.0) if leaf == "weight" else t.zero_()
    is_linear = t.dim() == 2
    if siglip and is_linear:
        return nn.init.trunc_normal_(t, std=0.02, generator=g)
    if siglip and leaf == "bias" and "patch_embed" not in name:
        return t.zero_()
    # PyTorch's default for Linear / Conv2d: kaiming-uniform(a=sqrt(5)) weights, uniform(1/sqrt(fan_in)) biases
    fan = _fan_in(tuple(t.shape)) if leaf != "bias" else (fan_in or t.shape[0])
    bound = 1.0 / math.sqrt(fan)
    return nn.init.uniform_(t, -bound, bound, generator=g)


def initial_values(model: nn.Module, cfg: ModelConfig,
                   seed: int) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, full initial value) for every parameter of ``model`` (a whole model or a stage)."""
    shapes = {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        canon = canonical_name(name)
        weight = shapes.get(canon[: -len("bias")] + "weight") if canon.endswith(".bias") else None
        fan_in = _fan_in(weight) if weight and len(weight) > 1 else None  # None: a norm's bias
        yield name, p, initial_value(cfg, canon, tuple(p.shape), seed, fan_in)


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (activation checkpointing, torch.compile) so names match across layouts."""
    for junk in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(junk, "")
    return name
