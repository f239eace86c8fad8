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


def initial_value(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full (unsharded) fp32 initial value of parameter ``name``."""
    g = torch.Generator().manual_seed(param_seed(seed, name))
    t = torch.empty(shape)
    leaf = name.rsplit(".", 1)[-1]
    std = cfg.init_std
    if name.startswith("embed.vision."):
        if leaf == "pos_embed":
            return nn.init.trunc_normal_(t, std=0.02, generator=g)
        if leaf in ("rel_pos_h", "rel_pos_w", "hd_alpha_downsamples"):
            return t.zero_()
        if len(shape) == 1:  # LayerNorm / LayerNorm2d
            return t.fill_(1.0) if leaf == "weight" else t.zero_()
        if leaf == "bias":
            return t.zero_()
        # Linear / Conv2d weights: PyTorch's default kaiming-uniform(a=sqrt(5)) bound
        bound = 1.0 / math.sqrt(_fan_in(shape))
        return nn.init.uniform_(t, -bound, bound, generator=g)
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


def initial_values(model: nn.Module, cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, full initial value) for every parameter of ``model`` (a whole model or a stage)."""
    for name, p in model.named_parameters():
        yield name, p, initial_value(cfg, canonical_name(name), tuple(p.shape), seed)


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (activation checkpointing, torch.compile) so names match across layouts."""
    for junk in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(junk, "")
    return name
