"""The training loop: read it top to bottom.

check layout + data -> start processes -> this rank's model share (pipeline stages, TP, FSDP) -> previous
stage's weights -> optimizer over trainable parameters -> for each step: forward/backward over the
microbatches, clip by the global norm, step, log, checkpoint -> evaluate.
The same code runs a single process (every degree 1, no collective) and any torchrun layout.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlpretrain.config import Config, ConfigError, trainable_parts
from vlpretrain.data.loader import DataPipeline, resolve
from vlpretrain.data.tokenizer import TextTokenizer
from vlpretrain.eval.mcppl import evaluate_mcppl
from vlpretrain.models.flops import step_flops
from vlpretrain.models.pretrained import load_pretrained_parts
from vlpretrain.parallel.engine import ParallelModel
from vlpretrain.parallel.mesh import init_parallel, local_device, resolve_layout, world_size_from_env
from vlpretrain.train.checkpoint import find_weights, load_weights, save_checkpoint
from vlpretrain.train.metrics import MetricsLogger, device_peak_tflops
from vlpretrain.train.optim import build_optimizer, lr_multiplier


def _check_inputs(cfg: Config) -> tuple[TextTokenizer, Path | None, Path | None]:
    """Everything a user can get wrong, checked before any process group or model exists."""
    tc = cfg.train
    resolve_layout(cfg, world_size_from_env())
    tokenizer = TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"config error: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")
    if tokenizer.image_id != cfg.model.image_token_id:
        raise ConfigError(f"config error: model.image_token_id={cfg.model.image_token_id} but the tokenizer's "
                          f"<image_placeholder> is {tokenizer.image_id}")
    eval_path = resolve(cfg.data.root, tc.eval_file) if tc.eval_file else None
    if eval_path is not None and not eval_path.is_file():
        raise FileNotFoundError(f"train.eval_file not found: {eval_path}")
    init_file = find_weights(tc.init_from) if tc.init_from else None
    for key in ("llm", "siglip", "sam"):
        path = getattr(tc.pretrained, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"train.pretrained.{key} not found: {path}")
        if path and world_size_from_env() > 1:
            raise ConfigError("config error: train.pretrained loads on a single process for now: run stage 1 "
                              "for one step on one process and pass its run dir as train.init_from")
    return tokenizer, eval_path, init_file


def train(cfg: Config) -> dict:
    t_start = time.perf_counter()
    tc = cfg.train
    tokenizer, eval_path, init_file = _check_inputs(cfg)
    device = local_device(cfg)
    ctx = init_parallel(cfg, device)
    lay = ctx.layout
    run_dir = Path(tc.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # ---- data: every rank follows the same global sample sequence and keeps its dp slice
    data = DataPipeline(cfg, tokenizer, dp_rank=ctx.dp_rank, dp_size=lay.dp)  # opens every source now
    model = ParallelModel(cfg, ctx)
    data.load_images = model.has_first  # only ranks that run the vision encoder decode images
    batches = data.steps(pin_memory=device.type == "cuda")

    # ---- weights, optimizer
    if init_file is not None:
        for m in model.modules:
            load_weights(m, init_file)
    pre = tc.pretrained
    if pre.llm or pre.siglip or pre.sam:
        load_pretrained_parts(model.modules[0], llm=pre.llm or None, siglip=pre.siglip or None,
                              sam=pre.sam or None)
    params = model.trainable_parameters()
    optimizer, scheduler = build_optimizer(params, tc) if params else (None, None)
    trainable = trainable_parts(cfg)
    peak = device_peak_tflops(cfg, device)
    logger = MetricsLogger(cfg, run_dir, tc.steps, is_main=ctx.is_main)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    if ctx.is_main:
        print(f"training stage {tc.stage} ({'+'.join(trainable)}) of {cfg.model.name} on {device}: "
              f"{tc.steps} steps x {tc.global_batch_size} samples x {tc.seq_len} tokens; layout dp={lay.dp} "
              f"tp={lay.tp} pp={lay.pp} vpp={lay.vpp} split={model.split}", flush=True)

    # ---- the loop
    consumed, first_loss, loss, data_state = 0, None, float("nan"), data.state_dict()
    for step in range(1, tc.steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        data_state = batch.data_state
        loss = model.forward_backward(batch.microbatches, batch.num_label_tokens)
        grad_norm = model.clip_grad_norm_(tc.grad_clip)
        lr = tc.lr * lr_multiplier(step - 1, tc)
        if optimizer is not None:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0

        consumed += batch.num_samples
        first_loss = loss if first_loss is None else first_loss
        flops = step_flops(cfg.model, tc.global_batch_size, tc.seq_len, batch.num_images, trainable).total
        flops_per_device = flops / lay.world_size
        logger.log({
            "step": step, "loss": loss, "modality": batch.modality, "lr": lr, "grad_norm": grad_norm,
            "tokens": batch.num_tokens, "tokens_per_s": batch.num_tokens / dt, "step_time_s": dt,
            "model_tflops": flops_per_device / dt / 1e12, "mfu": flops_per_device / dt / 1e12 / peak,
            "consumed_samples": consumed, "images": batch.num_images,
            "language_ratio_target": batch.language_ratio_target,
            "language_ratio_realized": batch.language_ratio_realized, "samples_digest": batch.samples_digest,
            "source_counts": batch.source_counts, "bad_samples": batch.bad_samples, "bad_images": batch.bad_images,
            "skipped_samples": sum(data_state["bad_total"].values()),
        })
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < tc.steps:
            _save(model, ctx, ckpt_dir, step, cfg, data_state)
        if eval_path is not None and tc.eval_interval and step % tc.eval_interval == 0 and step < tc.steps \
                and lay.world_size == 1:
            acc = evaluate_mcppl(model.modules[0], cfg, tokenizer, eval_path, device)["accuracy"]
            print(f"eval step {step}: mcppl accuracy {acc:.3f}", flush=True)

    _save(model, ctx, ckpt_dir, tc.steps, cfg, data_state)
    logger.close()
    summary = {"steps": tc.steps, "first_loss": first_loss, "final_loss": loss,
               "wall_time_s": round(time.perf_counter() - t_start, 2), "skipped_samples": data_state["bad_total"],
               "checkpoint": str(ckpt_dir)}
    if eval_path is not None and lay.world_size == 1:
        summary["eval"] = evaluate_mcppl(model.modules[0], cfg, tokenizer, eval_path, device)
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _save(model: ParallelModel, ctx, ckpt_dir: Path, step: int, cfg: Config, data_state: dict) -> None:
    """Weights checkpoint (safetensors) + the data state. Multi-process layouts gather to rank 0 first."""
    meta = {"stage": cfg.train.stage, "model": cfg.model.name, "data_state": data_state}
    if ctx.layout.world_size == 1:
        save_checkpoint(model.modules[0], ckpt_dir, step, meta, cfg.checkpoint.keep_last)
        return
    from vlpretrain.parallel.gather import gather_full_state_dict

    state = gather_full_state_dict(model, ctx)
    if ctx.is_main:
        save_checkpoint(state, ckpt_dir, step, meta, cfg.checkpoint.keep_last)
    dist.barrier()
