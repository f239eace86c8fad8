"""Modality-grouped vs mixed global batches: training throughput on the tiny hybrid model, in one run.

The paper (Figure 7) reports +20% training efficiency from making every global step all-language or
all-multimodal: a mixed batch waits for its slowest (image) samples on every rank, and every microbatch pays
for the vision encoders. This runs ``vlpretrain train`` (the real data path, demo data) under torchrun with
dp = 2 (and dp = 1), once with ``data.group_by_modality: true`` and once false, at the same language share
(0.7), and prints sequences/s (packed rows of 128 tokens) of each and the ratio.

    python bench/modality_grouping.py [--steps 16] [--dp 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(dp: int, grouped: bool, steps: int, data: Path, out: Path) -> dict:
    sets = [f"data.root={data}", f"train.run_dir={out}", "train.init_from=", "train.eval_file=",
            f"train.steps={steps}", "train.global_batch_size=16", "train.micro_batch_size=4", "train.seq_len=128",
            "train.warmup_steps=0", f"data.group_by_modality={str(grouped).lower()}",
            "data.language_ratio.start=0.7", "data.language_ratio.end=0.7", "logging.log_interval=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp}"]
    cmd = launcher + ["-m", "vlpretrain", "train", "--config", str(ROOT / "configs/tiny/stage2.yaml"), "--set", *sets]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[2:]  # warm-up steps
    step_s = statistics.mean(r["step_time_s"] for r in rows)
    return {"seq_per_s": 16 / step_s, "step_s": step_s,
            "text_steps": sum(r["modality"] == "text" for r in rows), "steps": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from data_tools import generate_demo

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data"
        generate_demo(data, seed=0, scale=0.2, verbose=False)
        for dp in args.dp:
            res = {g: run(dp, g, args.steps, data, Path(d) / f"dp{dp}_{g}") for g in (True, False)}
            g, m = res[True], res[False]
            print(f"dp={dp}: grouped {g['seq_per_s']:.1f} sequences/s ({g['text_steps']}/{g['steps']} text steps) | "
                  f"mixed {m['seq_per_s']:.1f} sequences/s | grouped / mixed = {g['seq_per_s'] / m['seq_per_s']:.3f}")


if __name__ == "__main__":
    main()
