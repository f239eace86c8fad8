"""Pipeline balance on CPU: uniform vs vision-aware (``auto``) layer splits, measured side by side.

The tiny hybrid model is configured so the first stage (SigLIP + SAM + adaptor + embedding) is heavy. For
pp = 2 and pp = 4 it launches the same training step under torchrun (gloo, one thread per rank) once with
``layer_split: uniform`` and once with ``auto``, and prints the median step time of each, their ratio, and
per pipeline rank: the measured busy time (process CPU time per step: gloo waits block without spinning, so
this is the rank's compute) beside the cost model's prediction (FLOP model, calibrated to this CPU with one
factor: total measured busy time / total predicted time of the uniform run).

    python bench/pipeline_balance.py [--steps 6] [--pp 2 4]
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

MODEL = {  # heavy vision side, light decoder: 8 layers so pp=4 still has 2 per rank under uniform
    "name": "tiny-heavy-vision", "vocab_size": 512, "dim": 96, "n_layers": 8, "n_heads": 4, "ffn_dim": 256,
    "max_seq_len": 256, "image_token_id": 2,
    "siglip": {"image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4},
    "sam": {"enabled": True, "image_size": 128, "patch_size": 8, "width": 128, "depth": 4, "heads": 4,
            "window_size": 8, "global_attn_indexes": [1, 3], "neck_chans": 64, "interp_size": 32,
            "downsample_channels": [96, 128], "hd_path": True},
}


def config(pp: int, split: str, steps: int) -> dict:
    return {"model": MODEL,
            "train": {"stage": 3, "steps": steps, "global_batch_size": 16, "micro_batch_size": 2,
                      "seq_len": 160, "lr": 1e-4, "dtype": "fp32"},
            "parallel": {"dp": 1, "tp": 1, "pp": pp, "schedule": "1f1b", "layer_split": split}}


def worker(cfg_path: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from vlpretrain.config import config_from_dict
    from vlpretrain.data.synthetic import synthetic_microbatches
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import init_parallel
    from vlpretrain.train.optim import build_optimizer

    torch.set_num_threads(1)
    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    ctx = init_parallel(cfg, torch.device("cpu"))
    model = ParallelModel(cfg, ctx)
    params = model.trainable_parameters()
    opt = build_optimizer(params, cfg.train)[0] if params else None
    batches = [synthetic_microbatches(cfg, seed=s, images_per_sample=2) for s in range(2)]
    wall, busy = [], []
    for step in range(cfg.train.steps + 1):  # step 0 warms up (pipeline shape inference)
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        micro, n = batches[step % 2]
        model.forward_backward(micro, n)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        if step:
            wall.append(time.perf_counter() - w0)
            busy.append(time.process_time() - c0)
    result = {"pp_rank": ctx.pp_rank, "split": model.split, "step_s": statistics.median(wall),
              "busy_s": statistics.median(busy)}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(pp: int, split: str, steps: int, tmp: Path) -> list[dict]:
    run = tmp / f"pp{pp}_{split}"
    run.mkdir()
    (run / "cfg.json").write_text(json.dumps(config(pp, split, steps)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={pp}", __file__,
           "--worker", str(run / "cfg.json"), str(run)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return sorted((json.loads(p.read_text()) for p in run.glob("rank*.json")), key=lambda r: r["pp_rank"])


def predicted_rank_times(pp: int, split: list[int]) -> list[float]:
    from vlpretrain.config import config_from_dict
    from vlpretrain.parallel.balance import part_costs, predict

    cfg = config_from_dict(config(pp, split, 1))
    return predict(cfg, split, part_costs(cfg, images_per_sample=1.0))["stage_time"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for pp in args.pp:
            runs = {mode: launch(pp, mode, args.steps, Path(d)) for mode in ("uniform", "auto")}
            n_mb = config(pp, "uniform", 1)["train"]["global_batch_size"] // config(pp, "uniform", 1)["train"]["micro_batch_size"]
            pred = {m: [t * n_mb for t in predicted_rank_times(pp, r[0]["split"])] for m, r in runs.items()}
            calib = sum(r["busy_s"] for r in runs["uniform"]) / sum(pred["uniform"])
            print(f"\npp={pp}: {n_mb} microbatches of 2 x 160 tokens, 1F1B, tiny model with a heavy first stage")
            for mode, ranks in runs.items():
                print(f"  {mode:<8} split {ranks[0]['split']}: step {ranks[0]['step_s']:.3f} s")
                for r, p in zip(ranks, pred[mode]):
                    print(f"    rank {r['pp_rank']}: busy {r['busy_s']:.3f} s/step   predicted {p * calib:.3f} s/step")
            ratio = runs["auto"][0]["step_s"] / runs["uniform"][0]["step_s"]
            print(f"  step time auto / uniform = {ratio:.3f}  ({(1 / ratio - 1) * 100:+.1f}% throughput)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
