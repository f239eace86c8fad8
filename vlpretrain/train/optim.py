"""AdamW over trainable parameters only, and the paper's LR schedules (cosine / step) with linear warm-up."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from vlpretrain.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """LR factor for optimizer step ``step`` (0-based: the factor used by the (step+1)-th update)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "step":
        # DeepSeek-LLM's multi-step schedule: multiply by gamma at each milestone (fractions of all steps)
        passed = sum(1 for m in cfg.step_milestones if step >= round(m * cfg.steps))
        return cfg.step_gamma ** passed
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kernel_options(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's kernel from where the parameters live: the fused kernel (one launch per step for every tensor;
    DTensors too, torch >= 2.4) when all are on a GPU, else the multi-tensor ``foreach`` loop (CPU)."""
    on_gpu = all(p.device.type == "cuda" for p in params)
    return {"fused": True} if on_gpu else {"foreach": True}


def build_optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over ``params`` (the trainable ones: frozen parameters get no optimizer state) and its LR schedule:
    the trainer steps the scheduler once after every optimizer step, so the (i+1)-th update uses
    ``cfg.lr * lr_multiplier(i, cfg)``."""
    if not params:
        raise ValueError("no trainable parameter: check train.stage / train.trainable")
    # the multi-tensor and fused kernels need one tensor kind per call: under TP without FSDP the first stage's
    # parameters are plain tensors and the decoder's DTensors, so each kind gets its own param group (same
    # hyper-parameters; checkpoints key the optimizer state by parameter name, so grouping does not matter there)
    kinds: dict[type, list[torch.Tensor]] = {}
    for p in params:
        kinds.setdefault(type(p.data), []).append(p)
    opt = torch.optim.AdamW([{"params": group} for group in kinds.values()], lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                            **kernel_options(params))
    sched = LambdaLR(opt, lambda s: lr_multiplier(s, cfg))
    return opt, sched
