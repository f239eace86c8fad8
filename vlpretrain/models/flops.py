"""Forward FLOPs per model part, from the config alone (for MFU, and later the pipeline cost model).

Matmul FLOPs only (2 per multiply-add); attention scores counted as full (non-causal) S x S like Megatron's
MFU formula. Backward costs 1x forward for activation grads when anything upstream is trainable, plus 1x for
weight grads of trainable parts; a frozen part with nothing trainable upstream runs no backward.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlpretrain.config import ModelConfig


def _vit_layer_flops(tokens: int, width: int, mlp_ratio: float, attn_span: int) -> float:
    dense = 2 * tokens * (4 * width * width + 2 * width * int(width * mlp_ratio))
    attn = 4 * tokens * attn_span * width
    return dense + attn


def siglip_flops(cfg: ModelConfig) -> float:
    """Per image."""
    s = cfg.siglip
    t = (s.image_size // s.patch_size) ** 2
    patch = 2 * t * 3 * s.patch_size ** 2 * s.width
    return patch + s.depth * _vit_layer_flops(t, s.width, s.mlp_ratio, t)


def sam_flops(cfg: ModelConfig) -> float:
    """Per image: ViTDet (windowed + global blocks), neck(s), downsample convs."""
    a = cfg.sam
    if not a.enabled:
        return 0.0
    g = a.image_size // a.patch_size
    t = g * g
    total = 2 * t * 3 * a.patch_size ** 2 * a.width
    for i in range(a.depth):
        span = t if i in a.global_attn_indexes else a.window_size ** 2
        total += _vit_layer_flops(t, a.width, 4.0, span)
    neck = 2 * t * (a.width * a.neck_chans + 9 * a.neck_chans * a.neck_chans)
    total += neck * (2 if a.hd_path else 1)
    grid, cin = a.interp_size, a.neck_chans
    for cout in a.downsample_channels:
        grid = (grid - 1) // 2 + 1
        total += 2 * grid * grid * 9 * cin * cout
        cin = cout
    return total


def adaptor_flops(cfg: ModelConfig) -> float:
    """Per image."""
    t, n = cfg.image_tokens, cfg.dim
    if cfg.sam.enabled:
        return 2 * t * (cfg.sam.downsample_channels[-1] * n // 2 + cfg.siglip.width * n // 2 + n * n)
    return 2 * t * (cfg.siglip.width * n + n * n)


def decoder_layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Per sequence of ``seq_len`` tokens."""
    d, hd = cfg.dim, cfg.head_dim
    proj = 2 * d * (cfg.n_heads * hd * 2 + cfg.kv_heads * hd * 2)
    ffn = 2 * 3 * d * cfg.ffn_dim
    attn = 4 * seq_len * cfg.n_heads * hd
    return seq_len * (proj + ffn + attn)


def head_flops(cfg: ModelConfig, seq_len: int) -> float:
    return 2 * seq_len * cfg.dim * cfg.vocab_size


@dataclass
class StepFlops:
    forward: float
    total: float  # forward + backward


def step_flops(cfg: ModelConfig, sequences: int, seq_len: int, images: int, trainable: list[str]) -> StepFlops:
    """Model FLOPs of one optimizer step over ``sequences`` sequences holding ``images`` images."""
    f_sam, f_sig = sam_flops(cfg) * images, siglip_flops(cfg) * images
    f_ada = adaptor_flops(cfg) * images
    f_llm = sequences * (cfg.n_layers * decoder_layer_flops(cfg, seq_len) + head_flops(cfg, seq_len))
    fwd = f_sam + f_sig + f_ada + f_llm
    towers_train = "sam" in trainable or "siglip" in trainable
    bwd = 0.0
    bwd += 2 * f_sam if "sam" in trainable else 0.0  # weight grads + activation grads inside the tower
    bwd += 2 * f_sig if "siglip" in trainable else 0.0
    bwd += f_ada * (("adaptor" in trainable) + towers_train)
    if "llm" in trainable:
        bwd += 2 * f_llm
    elif "adaptor" in trainable or towers_train:
        bwd += f_llm  # activation grads only, flowing back to the adaptor
    return StepFlops(forward=fwd, total=fwd + bwd)
