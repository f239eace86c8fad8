"""The hybrid vision encoder: SigLIP-L/16 @384 (semantics) + SAM-B @1024 (high-resolution detail).

Both towers are timm's architectures (``vit_large_patch16_siglip_384`` and ``samvit_base_patch16``), built from
the registered names with size overrides so tiny test models share the code path. Following DeepSeek-VL's
released model, the input is the 1024 image in [0, 1]; each tower normalises internally and SigLIP sees the image
resized to 384 with antialiasing. SAM's neck output (64x64x256) is resized to 96x96 and downsampled by two
stride-2 convs to 24x24x1024, so both towers give 576 tokens per image.

LayerNorm eps follows DeepSeek-VL's modules, not timm's defaults: 1e-6 everywhere (SigLIP's blocks and final norm,
SAM's blocks via ``partial(nn.LayerNorm, eps=1e-6)`` in their ``create_sam_vit``, SAM's neck ``LayerNorm2d``).
timm's samvit would otherwise build its blocks with ``nn.LayerNorm``'s 1e-5.
"""
from __future__ import annotations

import copy
import functools

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.config import ModelConfig, SAMConfig, SigLIPConfig

LAYER_NORM_EPS = 1e-6  # every LayerNorm of both towers (DeepSeek-VL's sam.py / siglip_vit.py)


def _normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


class SigLIPTower(nn.Module):
    """timm ViT without class token or pooling head: (N, 3, H, W) in [0, 1] -> (N, (H/p)^2, width)."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = timm.create_model(
            "vit_large_patch16_siglip_384", pretrained=False, num_classes=0, global_pool="",
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
            norm_layer=functools.partial(nn.LayerNorm, eps=LAYER_NORM_EPS))

    @property
    def out_dim(self) -> int:
        return self.cfg.width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            size = (self.cfg.image_size, self.cfg.image_size)
            # in fp32: CPU has no bf16 antialiased resize, and the resize should not round twice
            images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False,
                                   antialias=True).to(images.dtype)
        return self.vit.forward_features(_normalize(images, self.cfg.mean, self.cfg.std))


class SAMTower(nn.Module):
    """timm ViTDet (SAM image encoder) + DeepSeek-VL's resize and stride-2 downsample convs.

    (N, 3, 1024, 1024) in [0, 1] -> (N, 576, 1024) at real size.
    """

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = timm.create_model(
            "samvit_base_patch16", pretrained=False, num_classes=0,
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, window_size=cfg.window_size, global_attn_indexes=list(cfg.global_attn_indexes),
            neck_chans=cfg.neck_chans, norm_layer=functools.partial(nn.LayerNorm, eps=LAYER_NORM_EPS))
        chans = [cfg.neck_chans, *cfg.downsample_channels]
        self.downsamples = nn.Sequential(*[
            nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False)
            for cin, cout in zip(chans[:-1], chans[1:])])
        if cfg.hd_path:
            # side path from the first global-attention block, same shape as the neck, gated by a scalar
            # initialised to 0 so that it starts as a no-op
            self.neck_hd = copy.deepcopy(self.vit.neck)
            self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1))

    @property
    def out_dim(self) -> int:
        return self.cfg.downsample_channels[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(_normalize(images, self.cfg.mean, self.cfg.std))  # NHWC
        x = x + vit.pos_embed
        first_global = None
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            if first_global is None and i in self.cfg.global_attn_indexes:
                first_global = x
        x = vit.neck(x.permute(0, 3, 1, 2))
        if self.cfg.hd_path:
            x = x + self.hd_alpha_downsamples * self.neck_hd(first_global.permute(0, 3, 1, 2))
        size = (self.cfg.interp_size, self.cfg.interp_size)
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)
        x = self.downsamples(x)
        return x.flatten(2).transpose(1, 2)


class HybridVisionEncoder(nn.Module):
    """Returns (high, low) = (SAM tokens or None, SigLIP tokens), each (N, 576, 1024) at real size."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.siglip = SigLIPTower(cfg.siglip)
        self.sam = SAMTower(cfg.sam) if cfg.sam.enabled else None
        # how a tower runs on a batch: ``run_tower(tower, images)``; train/tower_cache.py may set it (None:
        # ``tower(images)``), e.g. to reuse a frozen tower's outputs for images it has already encoded
        self.run_tower = None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        run = self.run_tower or _call
        high = run(self.sam, images) if self.sam is not None else None
        low = run(self.siglip, images)
        return high, low


def _call(tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return tower(images)
