"""Single-GPU check at real size: DeepSeek-VL 1.3B stage 2 (adaptor + LLM train, SigLIP frozen), bf16.

Runs a few optimizer steps through the framework's engine (all degrees 1) and, in the same process, a plain
PyTorch loop over the same model (autocast bf16, fused AdamW, the same activation checkpointing), on the same
synthetic batches. Prints tokens/s, MFU and peak memory for both and their ratio.

    python bench/gpu_check.py [--steps 6] [--seq 4096] [--micro 1] [--accum 4] [--ac full]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vlpretrain.config import load_config, trainable_parts
from vlpretrain.data.synthetic import synthetic_microbatches
from vlpretrain.models.flops import step_flops
from vlpretrain.models.vlm import build_model, set_trainable
from vlpretrain.parallel.engine import ParallelModel, text_loss
from vlpretrain.parallel.fsdp import apply_activation_checkpointing
from vlpretrain.parallel.mesh import ParallelContext, resolve_layout
from vlpretrain.train.metrics import device_peak_tflops
from vlpretrain.train.optim import build_optimizer


def measure(step_fn, batches, steps: int) -> tuple[float, float]:
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_fn(batches[i % len(batches)])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), torch.cuda.max_memory_allocated() / 2**30


def run_engine(cfg, device, batches, steps: int) -> tuple[float, float]:
    """The framework's engine on a single process (every degree 1)."""
    engine = ParallelModel(cfg, ParallelContext(resolve_layout(cfg, 1), device, None))
    opt, _ = build_optimizer(engine.trainable_parameters(), cfg.train)

    def step(batch):
        mbs, n = batch
        engine.forward_backward(mbs, n)
        engine.clip_grad_norm_(cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(step, batches, steps)


def run_plain(cfg, device, batches, steps: int, ac: str) -> tuple[float, float]:
    """A plain PyTorch loop over the same model: autocast bf16, fused AdamW, the same checkpointing."""
    model = build_model(cfg.model, device, seed=cfg.train.seed)
    set_trainable(model, trainable_parts(cfg))
    apply_activation_checkpointing(model, ac)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(0.9, 0.95), fused=True)

    def step(batch):
        mbs, n = batch
        for mb in mbs:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(mb.tokens.to(device), mb.images.to(device) if mb.images is not None else None)
            text_loss(logits, mb.labels.to(device), n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(step, batches, steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/deepseek-vl-1.3b/stage2.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--ac", default="full", choices=["none", "selective", "full"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    cfg = load_config(args.config, [
        f"train.seq_len={args.seq}", f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={args.micro * args.accum}", "train.dtype=bf16", "train.init_from=",
        "parallel.dp=1", "parallel.pp=1", "parallel.tp=1", f"parallel.activation_checkpointing={args.ac}",
        "train.pretrained.llm=", "train.pretrained.siglip=", "train.pretrained.sam="])
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    batches = [synthetic_microbatches(cfg, seed=s, images_per_sample=1) for s in range(2)]
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    images = cfg.train.global_batch_size // 2  # on average one image for every other sample (0 or 1 each)
    flops = step_flops(cfg.model, cfg.train.global_batch_size, cfg.train.seq_len, images,
                       trainable_parts(cfg)).total
    peak = device_peak_tflops(cfg, device)

    t_engine, mem_engine = run_engine(cfg, device, batches, args.steps)
    torch.cuda.empty_cache()
    t_plain, mem_plain = run_plain(cfg, device, batches, args.steps, args.ac)

    report = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "seq_len": args.seq,
              "global_batch": cfg.train.global_batch_size, "activation_checkpointing": args.ac}
    for name, t, mem in (("engine", t_engine, mem_engine), ("plain", t_plain, mem_plain)):
        report[name] = {"step_s": round(t, 4), "tokens_per_s": round(tokens / t, 1),
                        "mfu": round(flops / t / 1e12 / peak, 4), "peak_mem_gib": round(mem, 2)}
    report["engine_over_plain_tokens_per_s"] = round(t_plain / t_engine, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
