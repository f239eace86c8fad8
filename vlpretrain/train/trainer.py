"""The training loop: read it top to bottom.

build model -> load previous stage -> freeze per stage -> optimizer + schedule -> data -> for each step:
forward/backward over the microbatches (gradient accumulation), clip, step, log, checkpoint -> evaluate.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.config import Config, ConfigError, trainable_parts
from vlpretrain.data.loader import GlobalBatch, StepBatches, resolve
from vlpretrain.data.samples import IGNORE
from vlpretrain.data.tokenizer import TextTokenizer
from vlpretrain.eval.mcppl import evaluate_mcppl
from vlpretrain.models.flops import step_flops
from vlpretrain.models.pretrained import load_pretrained_parts
from vlpretrain.models.vlm import build_model, set_trainable
from vlpretrain.train.checkpoint import find_weights, load_weights, save_checkpoint
from vlpretrain.train.metrics import MetricsLogger, device_peak_tflops
from vlpretrain.train.optim import build_optimizer


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no GPU is visible")
    return torch.device(cfg.train.device)


def autocast_context(cfg: Config, device: torch.device):
    """bf16 autocast on GPU (dtype auto/bf16), fp32 on CPU unless bf16 is asked for explicitly."""
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def text_loss(logits: torch.Tensor, labels: torch.Tensor, num_label_tokens: int) -> torch.Tensor:
    """Sum of next-token CE over supervised positions / supervised tokens in the whole global batch, so that
    accumulation over microbatches (and later ranks) gives the global mean exactly."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return ce / max(num_label_tokens, 1)


def forward_backward(model: nn.Module, batch: GlobalBatch, device: torch.device, amp) -> float:
    """Gradient accumulation over the step's microbatches; returns the step's mean loss."""
    total = 0.0
    for mb in batch.microbatches:
        images = mb.images.to(device, non_blocking=True) if mb.images is not None else None
        with amp:
            logits = model(mb.tokens.to(device, non_blocking=True), images)
        loss = text_loss(logits, mb.labels.to(device, non_blocking=True), batch.num_label_tokens)
        loss.backward()
        total += float(loss.detach())
    return total


def train(cfg: Config) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise RuntimeError(f"WORLD_SIZE={world}: this build trains on one process; use --nproc_per_node 1")
    t_start = time.perf_counter()
    device = resolve_device(cfg)
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(tc.seed)

    # ---- data first: a missing file or bad source fails before any model is built
    tokenizer = TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"config error: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer.vocab_size}")
    if tokenizer.image_id != cfg.model.image_token_id:
        raise ConfigError(f"config error: model.image_token_id={cfg.model.image_token_id} but the tokenizer's "
                         f"<image_placeholder> is {tokenizer.image_id}")
    accumulation = tc.global_batch_size // tc.micro_batch_size
    data = StepBatches(cfg, tokenizer, num_microbatches=accumulation)
    eval_path = resolve(cfg.data.root, tc.eval_file) if tc.eval_file else None
    if eval_path is not None and not eval_path.is_file():
        raise FileNotFoundError(f"train.eval_file not found: {eval_path}")
    init_file = find_weights(tc.init_from) if tc.init_from else None
    for key in ("llm", "siglip", "sam"):
        path = getattr(tc.pretrained, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"train.pretrained.{key} not found: {path}")

    # ---- model, previous stage, freezing, optimizer
    model = build_model(cfg.model, device, seed=tc.seed)
    if init_file is not None:
        load_weights(model, init_file)
    pre = tc.pretrained
    if pre.llm or pre.siglip or pre.sam:
        load_pretrained_parts(model, llm=pre.llm or None, siglip=pre.siglip or None, sam=pre.sam or None)
    trainable = trainable_parts(cfg)
    set_trainable(model, trainable)
    if tc.compile:
        for layer in model.layers.values():
            layer.compile()
    model.train()
    optimizer, scheduler = build_optimizer(model, tc)
    params = [p for p in model.parameters() if p.requires_grad]
    amp = autocast_context(cfg, device)
    peak = device_peak_tflops(cfg, device)
    logger = MetricsLogger(cfg, run_dir, tc.steps)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    print(f"training stage {tc.stage} ({'+'.join(trainable)}) of {cfg.model.name} on {device}: "
          f"{tc.steps} steps x {tc.global_batch_size} samples x {tc.seq_len} tokens", flush=True)

    # ---- the loop
    consumed, lang_steps, first_loss, loss = 0, 0, None, float("nan")
    for step in range(1, tc.steps + 1):
        t0 = time.perf_counter()
        batch = next(data)
        loss = forward_backward(model, batch, device, amp)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0

        consumed += tc.global_batch_size
        lang_steps += batch.modality == "text"
        first_loss = loss if first_loss is None else first_loss
        flops = step_flops(cfg.model, tc.global_batch_size, tc.seq_len, batch.num_images, trainable).total
        logger.log({
            "step": step, "loss": loss, "modality": batch.modality, "lr": lr, "grad_norm": grad_norm,
            "tokens": batch.num_tokens, "tokens_per_s": batch.num_tokens / dt, "step_time_s": dt,
            "model_tflops": flops / dt / 1e12, "mfu": flops / dt / 1e12 / peak,
            "consumed_samples": consumed, "images": batch.num_images,
            "language_ratio_target": batch.language_ratio_target, "language_ratio_realized": lang_steps / step,
            "source_counts": batch.source_counts, "skipped_samples": sum(data.skipped().values()),
        })
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < tc.steps:
            save_checkpoint(model, ckpt_dir, step, {"stage": tc.stage, "model": cfg.model.name}, cfg.checkpoint.keep_last)
        if eval_path is not None and tc.eval_interval and step % tc.eval_interval == 0 and step < tc.steps:
            acc = evaluate_mcppl(model, cfg, tokenizer, eval_path, device)["accuracy"]
            print(f"eval step {step}: mcppl accuracy {acc:.3f}", flush=True)

    save_checkpoint(model, ckpt_dir, tc.steps, {"stage": tc.stage, "model": cfg.model.name}, cfg.checkpoint.keep_last)
    logger.close()
    summary = {"steps": tc.steps, "first_loss": first_loss, "final_loss": loss,
               "wall_time_s": round(time.perf_counter() - t_start, 2), "skipped_samples": data.skipped(),
               "checkpoint": str(ckpt_dir)}
    if eval_path is not None:
        summary["eval"] = evaluate_mcppl(model, cfg, tokenizer, eval_path, device)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
