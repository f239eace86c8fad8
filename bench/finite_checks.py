"""What the non-finite checks cost (``train.check_finite``): time per step with them on and off, and the save.

Per step the checks are two ``math.isfinite`` of numbers the step has on the host already, the loss-spike test
(a median of at most ``train.spike_window`` floats), and with more than one rank a 3-float all-reduce over the
world so that every rank skips alike (it also sums the step's undecodable images). A bad step's forward re-run
costs only on bad steps. Each save scans every floating tensor it writes (min / max per local shard, one sync for
all). This bench:

- step: launches ``vlpretrain train`` (tiny hybrid model, stage 2, demo data) under torchrun at each ``--dp``, with
  ``train.check_finite`` true and false, interleaved on, off, on, off ... (``bench/_ab.py``); a launch's figure is
  the median ``step_time_s`` of its timed steps (the first ``--warmup-steps`` are not timed), as steps/s;
- save: ``Checkpointer.save`` of the tiny model with AdamW states (one process), check on and off, interleaved.

``ratio`` = on / off throughput (> 0.99: the goal, under 1% cost).

    python bench/finite_checks.py [--dp 1 2] [--steps 30] [--warmup-steps 5] [--repeats 5] [--saves 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ab  # noqa: E402

GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 8, 4, 128


def run_steps(dp: int, check: bool, warmup_steps: int, steps: int, data: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"data.root={data}", f"train.run_dir={out}", "train.init_from=", "train.eval_file=", "train.eval_text=",
            f"train.steps={warmup_steps + steps}", f"train.global_batch_size={GLOBAL_BATCH}",
            f"train.micro_batch_size={MICRO_BATCH}", f"train.seq_len={SEQ_LEN}", "logging.log_interval=1000",
            f"train.check_finite={str(check).lower()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp}", "-m", "vlpretrain",
           "train", "--config", str(ROOT / "configs/tiny/stage2.yaml"), "--set", *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train failed (dp={dp}, check={check}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if r["step"] > warmup_steps]
    med = statistics.median(times)
    return {"steps_per_s": 1 / med, "step_ms": 1e3 * med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per launch")
    ap.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    ap.add_argument("--saves", type=int, default=10, help="timed saves per variant (0: skip the save bench)")
    _ab.add_args(ap, repeats=5, warmup=1)
    args = ap.parse_args()
    from data_tools import generate_demo

    records = []
    log = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        if args.saves:
            import torch
            from ckpt_checksum import tiny_state  # the same tiny model + AdamW state the checksum bench saves

            from vlpretrain.checkpoint.dcp import Checkpointer, first_nonfinite

            torch.set_num_threads(1)
            (model,), (opt,) = tiny_state()

            def save(check: bool) -> dict:
                ck = Path(d) / f"save_{check}"
                shutil.rmtree(ck, ignore_errors=True)
                c = Checkpointer(ck, [model], [opt], keep_last=1, is_main=True)
                c.check_finite = check
                t0 = time.perf_counter()
                c.save(1, {"consumed_samples": 0, "data_state": {}})
                return {"saves_per_s": 1 / (time.perf_counter() - t0)}

            res = _ab.interleave({"on": lambda: save(True), "off": lambda: save(False)}, args.saves, args.warmup)
            t0 = time.perf_counter()
            for _ in range(20):
                first_nonfinite(Checkpointer(Path(d) / "x", [model], [opt], 1, True)._state())
            scan_ms = (time.perf_counter() - t0) / 20 * 1e3
            print("save of the tiny model + AdamW (one process):")
            print(_ab.table(res, ["saves_per_s"]))
            rec = _ab.record("finite_checks", {"what": "save"}, res, "on", "off", "saves_per_s", goal=0.99,
                             scan_ms=round(scan_ms, 3))
            print(_ab.ratio_line(rec) + f"; the scan alone: {scan_ms:.2f} ms", flush=True)
            records.append(rec)
        data = Path(d) / "data"
        generate_demo(data, seed=0, scale=0.05, verbose=False)
        for dp in args.dp:
            print(f"\ndp={dp}: tiny stage 2, {GLOBAL_BATCH} x {SEQ_LEN} tokens per step; {args.warmup_steps} untimed + "
                  f"{args.steps} timed steps per launch, median step time; launches interleaved", flush=True)
            variants = {name: (lambda c=c, dp=dp: run_steps(dp, c, args.warmup_steps, args.steps, data,
                                                             Path(d) / f"dp{dp}_{c}"))
                        for name, c in (("on", True), ("off", False))}
            res = _ab.interleave(variants, args.repeats, args.warmup, log=log)
            print(_ab.table(res, ["steps_per_s", "step_ms"]))
            rec = _ab.record("finite_checks", {"what": "step", "dp": dp}, res, "on", "off", "steps_per_s", goal=0.99)
            print(_ab.ratio_line(rec), flush=True)
            records.append(rec)
    _ab.emit(records)


if __name__ == "__main__":
    main()
