"""The VL adaptor (DeepSeek-VL's ``MlpProjector``).

Hybrid tower: ``high_up_proj`` (SAM) and ``low_up_proj`` (SigLIP) each map to n/2, concatenated (high first),
GELU, then ``layers.1`` Linear(n, n). SigLIP-only (1.3B): ``layers`` = Linear(1024, n), GELU, Linear(n, n).
The attribute names match the released checkpoints so their keys map one to one.
"""
from __future__ import annotations

import torch
from torch import nn


class VLAdaptor(nn.Module):
    def __init__(self, low_dim: int, n_embed: int, high_dim: int | None = None):
        super().__init__()
        self.hybrid = high_dim is not None
        if self.hybrid:
            if n_embed % 2:
                raise ValueError(f"hybrid adaptor needs an even LLM width, got {n_embed}")
            self.high_up_proj = nn.Linear(high_dim, n_embed // 2)
            self.low_up_proj = nn.Linear(low_dim, n_embed // 2)
            self.layers = nn.Sequential(nn.GELU(), nn.Linear(n_embed, n_embed))
        else:
            self.layers = nn.Sequential(nn.Linear(low_dim, n_embed), nn.GELU(), nn.Linear(n_embed, n_embed))

    def forward(self, high: torch.Tensor | None, low: torch.Tensor) -> torch.Tensor:
        if self.hybrid:
            x = torch.cat([self.high_up_proj(high), self.low_up_proj(low)], dim=-1)
        else:
            x = low
        return self.layers(x)
