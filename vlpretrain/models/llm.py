"""LLaMA-style decoder (DeepSeek-LLM): pre-norm RMSNorm, SwiGLU, rotary embeddings, untied head.

Plain PyTorch that knows nothing about parallelism. Tensor parallelism shards the Linear layers from outside,
so attention reshapes with ``-1`` heads (the local count under TP) instead of the configured count.
Rotary embeddings use the half-rotation layout of HF ``LlamaForCausalLM``, so HF weights load unpermuted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 like HF Llama, then cast back before the weight
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)



def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, S, head_dim) for integer positions (B, S); computed in fp32 as HF does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    with torch.autocast(device_type=positions.device.type, enabled=False):
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, D); cos/sin: (B, S, D)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer (generation, ``eval/generate.py``)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, H_kv, S, D) keys / values; returns all of them so far."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.n_rep = cfg.n_heads // cfg.kv_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, S, dim); ``rope`` the rotary (cos, sin) tables of the S positions, (B, S, head_dim) fp32, built
        once per forward by the model (default: positions arange(S), after the cached ones); ``mask`` the
        document-causal attention of packed rows (``models/attention.py``: ``attend(q, k, v)``), or None for
        plain causal attention. ``cache`` (generation only, with ``mask`` None): x holds the S tokens after the
        cached ones, which it attends to as well; their keys / values are appended.

        x is the full sequence here even under sequence parallelism (the TP plan gathers it first), and rope /
        mask are always full length S (built from the full-length inputs), so nothing here depends on the
        block's (possibly sharded) input.
        """
        b, s, _ = x.shape
        past = cache.length if cache is not None else 0
        if rope is None:
            rope = rotary_cos_sin(torch.arange(past, past + s, device=x.device).expand(b, -1), self.head_dim,
                                  self.rope_theta)
        cos, sin = rope
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        if mask is not None:  # packed rows: document-causal
            out = mask.attend(q, k, v)
        elif past:  # query i (at past + i) sees keys 0..past + i
            causal = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        else:  # fast path: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, mask=None,
                cache: KVCache | None = None) -> torch.Tensor:
        # attention keeps three positional arguments (x, rope, mask): the TP/SP plan's PrepareModuleInput
        # for it lists one layout per positional argument (``cache``, generation only, is a keyword)
        kw = {"cache": cache} if cache is not None else {}
        h = h + self.attention(self.attention_norm(h), rope, mask, **kw)
        return h + self.feed_forward(self.ffn_norm(h))


class OutputHead(nn.Module):
    """Final RMSNorm + untied vocabulary projection: the last pipeline part."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))

