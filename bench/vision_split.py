"""Images split across the TP group vs the paper's recomputation, measured side by side in one run.

A heavy-vision tiny model at tp = 2 on two CPU processes (gloo, one thread
each), multimodal steps. Both engines (``parallel.vision_split: replicate`` and ``images``) are built in the
same processes on the same data and run interleaved (A B A B ...) after a warm-up. Reported per stage (2:
towers frozen, 3: SigLIP trainable): the median and min-max of the whole step (forward + backward over all
microbatches) and of the first stage alone (the embedding's forward + backward over the same microbatches:
towers, adaptor, the gather of the adaptor outputs), and the ratios replicate / images.

    python bench/vision_split.py [--repeats 5] [--stages 2 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# vision-heavy like a real first stage: at 7B a 1024-px image costs the towers about as much as 1.5 decoder
# layers over its 576 tokens; here the towers dominate the step, so the split's effect is visible on 2 cores
MODEL = {
    "name": "tiny-heavy-vision", "vocab_size": 512, "dim": 96, "n_layers": 4, "n_heads": 4, "ffn_dim": 256,
    "max_seq_len": 256, "image_token_id": 2,
    "siglip": {"image_size": 64, "patch_size": 8, "width": 192, "depth": 6, "heads": 4},
    "sam": {"enabled": True, "image_size": 256, "patch_size": 16, "width": 192, "depth": 6, "heads": 4,
            "window_size": 8, "global_attn_indexes": [2, 5], "neck_chans": 64, "interp_size": 32,
            "downsample_channels": [96, 128], "hd_path": True},
}


def config(stage: int, split: str) -> dict:
    return {"model": MODEL,
            "train": {"stage": stage, "steps": 1, "global_batch_size": 8, "micro_batch_size": 4, "seq_len": 160,
                      "lr": 1e-4, "dtype": "fp32"},
            "parallel": {"dp": 1, "tp": 2, "pp": 1, "vision_split": split}}


def _first_stage_time(model, micro) -> float:
    """Forward + backward of the first stage alone over the step's microbatches (all ranks in step)."""
    import torch
    import torch.distributed as dist

    embed = model.modules[0].embed
    dist.barrier()
    t0 = time.perf_counter()
    for mb in micro:
        out = embed(mb.tokens, mb.images)
        out.backward(torch.ones_like(out))
    dist.barrier()
    return time.perf_counter() - t0


def worker(out: str, stages: list[int], repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from vlpretrain.config import config_from_dict
    from vlpretrain.data.synthetic import synthetic_microbatches
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import init_parallel

    torch.set_num_threads(1)
    results = {}
    for stage in stages:
        models, batch = {}, None
        for split in ("replicate", "images"):
            cfg = config_from_dict(config(stage, split))
            models[split] = ParallelModel(cfg, init_parallel(cfg, torch.device("cpu")))
            batch = synthetic_microbatches(cfg, seed=0, images_per_sample=2)
        micro, n = batch
        images = sum(int((mb.tokens == MODEL["image_token_id"]).sum()) for mb in micro) // \
            models["images"].cfg.model.image_tokens
        times = {split: {"step": [], "first_stage": []} for split in models}
        for rep in range(repeats + 1):  # repeat 0 warms up
            for split, model in models.items():
                dist.barrier()
                t0 = time.perf_counter()
                model.forward_backward(micro, n)
                dist.barrier()
                step = time.perf_counter() - t0
                first = _first_stage_time(model, micro)
                for p in model.trainable_parameters():
                    p.grad = None
                if rep:
                    times[split]["step"].append(step)
                    times[split]["first_stage"].append(first)
        results[f"stage{stage}"] = {"images_per_step": images, "times": times}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.stages, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--repeats", str(args.repeats), "--stages", *map(str, args.stages), "--worker", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            sys.exit(f"bench failed:\n{proc.stderr[-4000:]}")
        results = json.loads(out.read_text())
    summary = {"bench": "vision_split", "tp": 2, "repeats": args.repeats}
    print(f"{'stage':<8}{'what':<13}{'replicate s (min-max)':>26}{'images s (min-max)':>26}{'ratio':>8}")
    for stage, res in results.items():
        for what in ("first_stage", "step"):
            a, b = (summarise(res["times"][s][what]) for s in ("replicate", "images"))
            ratio = a["median"] / b["median"]
            summary[f"{stage}_{what}_ratio"] = round(ratio, 3)
            print(f"{stage:<8}{what:<13}{a['median']:>9.3f} ({a['min']:.3f}-{a['max']:.3f}){'':>3}"
                  f"{b['median']:>9.3f} ({b['min']:.3f}-{b['max']:.3f}){'':>3}{ratio:>8.2f}")
        summary[f"{stage}_images_per_step"] = res["images_per_step"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
