"""Per-rank CPU cost of the data path per step, for the 7B stage-2 batch (2304 packed rows of 4096 tokens,
language share 0.7) on the demo data, at simulated dp sizes: before (each rank plans by tokenising the WHOLE
global step, the code of ``--before`` commit, extracted with ``git archive`` and run in a subprocess) and after
(plan from stored sample sizes, tokenise only this rank's rows).

Measured on one simulated rank (dp rank 0, ``load_images=False``: text work only, which is what every rank
pays; image decoding is per first-stage rank and reported separately per image, for provisioning):

    python -m data_tools demo --out /tmp/demo      # once
    python bench/planner_scale.py --demo /tmp/demo     # alone on the machine: it times CPU work

Prints a table and, last, one JSON line. "% of step" divides by ``--step-time``, the step of the 512-GPU
layout (dp = 128); "plan only" is the global plan alone, which every rank computes (median of the steps).

Last run (2 cores, one used, alone; before = b17e730): per-rank CPU s/step 7.00 -> 0.86 at dp = 1,
4.92 -> 0.10 at dp = 16 (0.021x, 4.2% of the 2.48 s step), 4.82 -> 0.066 at dp = 64, 4.77 -> 0.049 at dp = 128
(2.0%); the plan 0.045 s of it (about 1 us per sample: vectorised draws, block choices, record-based first fit).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "b17e730"  # the last commit whose ranks tokenise the whole global step
SOURCES = ("[{name: interleaved, path: 'shards/interleaved-*.tar', modality: multimodal, weight: 15.2}, "
           "{name: captions, path: 'shards/captions-*.tar', modality: multimodal, weight: 11.1}, "
           "{name: ocr, path: 'shards/ocr-*.tar', modality: multimodal, weight: 3.0}, "
           "{name: sft, path: 'shards/sft-*.tar', modality: multimodal, weight: 4.0}, "
           "{name: text, path: corpus/text, modality: text, weight: 70.0}]")


def _config(demo: Path, tok):
    from vlpretrain.config import load_config

    return load_config(ROOT / "configs" / "deepseek-vl-7b" / "stage2.yaml", [
        f"model.image_token_id={tok.image_id}",  # the demo tokenizer's (the 7B model keeps its own sizes)
        f"data.root={demo}", "data.manifest=", f"data.sources={SOURCES}", "train.init_from=", "train.eval_file=",
        "data.num_workers=0", "data.language_ratio={start: 0.7, end: 0.7, warmup_steps: 0, shape: linear}",
        "train.global_batch_size=2304", "train.seq_len=4096", "train.micro_batch_size=1", "data.packing=true"])


def measure(demo: Path, dps: list[int], steps: int) -> dict:
    """Per-step CPU seconds of ``next(pipeline)`` on dp rank 0, for each simulated dp size."""
    import torch

    import vlpretrain
    from vlpretrain.data.loader import DataPipeline
    from vlpretrain.data.tokenizer import TextTokenizer

    torch.set_num_threads(1)
    tok = TextTokenizer(demo / "tokenizer.json")
    cfg = _config(demo, tok)
    out = {"code": str(Path(vlpretrain.__file__).parent), "dp": {}}
    DataPipeline(cfg, tok, load_images=False)  # sample-size indexes built (or loaded) outside the timing
    for dp in dps:
        pipe = DataPipeline(cfg, tok, dp_rank=0, dp_size=dp, load_images=False)
        per_step, text, mm, samples, images = [], [], [], [], []
        for _ in range(steps):
            t0 = time.process_time()
            b = next(pipe)
            dt = time.process_time() - t0
            per_step.append(dt)
            (text if b.modality == "text" else mm).append(dt)
            samples.append(b.num_samples)
            if b.modality != "text":
                images.append(b.num_images)
        row = {"mean_s": statistics.fmean(per_step), "median_s": statistics.median(per_step),
               "text_step_s": statistics.median(text) if text else None,
               "mm_step_s": statistics.median(mm) if mm else None,
               "samples_per_step": statistics.fmean(samples),
               "images_per_mm_step": statistics.fmean(images) if images else 0}
        plans = getattr(pipe, "plans", None)
        if plans is not None and hasattr(plans, "tables"):  # after: the global plan alone (sizes only)
            t = []
            for _ in range(steps):
                t0 = time.process_time()
                plans.plan()
                t.append(time.process_time() - t0)
            row["plan_only_s"] = statistics.median(t)
        out["dp"][str(dp)] = row
    return out


def image_cost(reps: int = 15) -> float:
    """CPU seconds to decode one photo-like 1024x768 JPEG and resize + pad it to 1024 (the 7B's SAM input)."""
    import numpy as np
    import torch
    from PIL import Image

    from vlpretrain.data.preprocess import CLIP_MEAN, decode_image, resize_and_pad

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((1024, 768), Image.BICUBIC)  # smooth, photo-like
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    raw, times = buf.getvalue(), []
    for _ in range(reps):
        t0 = time.process_time()
        resize_and_pad(decode_image(raw), 1024, CLIP_MEAN)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def run_before(demo: Path, dps: list[int], steps: int, commit: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "vlpretrain"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, __file__, "--demo", str(demo), "--dps", ",".join(map(str, dps)),
                              "--steps", str(steps), "--measure-only"], env=env, capture_output=True, text=True,
                             cwd=tmp)
        if res.returncode:
            raise SystemExit(f"before run failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="demo data (python -m data_tools demo --out DIR)")
    ap.add_argument("--dps", default="1,16,64,128")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--before", default=BEFORE, help="commit measured as 'before'")
    ap.add_argument("--step-time", type=float, default=2.484,
                    help="predicted 7B stage-2 step time, s (vlpretrain plan --config "
                         "configs/deepseek-vl-7b/stage2.yaml --world-size 512: dp=128, auto split)")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dps = [int(x) for x in args.dps.split(",")]
    demo = args.demo.resolve()
    if args.measure_only:
        print(json.dumps(measure(demo, dps, args.steps)))
        return
    sys.path.insert(0, str(ROOT))
    import logging
    logging.basicConfig(level=logging.ERROR)
    before = run_before(demo, dps, args.steps, args.before)
    after = measure(demo, dps, args.steps)
    img = image_cost()
    print(f"7B stage-2 step (2304 x 4096, packed, language share 0.7), demo data, per-rank CPU s/step "
          f"(rank 0, text work; median of {args.steps} steps' mean)")
    print(f"{'dp':>5} {'before':>9} {'after':>9} {'ratio':>7} {'plan only':>10} {'% of step':>10}")
    rows = []
    for dp in dps:
        b, a = before["dp"][str(dp)], after["dp"][str(dp)]
        ratio = a["mean_s"] / b["mean_s"]
        share = a["mean_s"] / args.step_time
        rows.append({"dp": dp, "before_s": round(b["mean_s"], 4), "after_s": round(a["mean_s"], 4),
                     "ratio": round(ratio, 4), "plan_only_s": round(a.get("plan_only_s", 0), 4),
                     "pct_of_step": round(100 * share, 2), "samples_per_step": round(a["samples_per_step"], 1),
                     "images_per_mm_step": round(a["images_per_mm_step"], 1)})
        print(f"{dp:>5} {b['mean_s']:>9.3f} {a['mean_s']:>9.3f} {ratio:>7.3f} {a.get('plan_only_s', 0):>10.3f} "
              f"{100 * share:>9.2f}%")
    mm_images = rows[0]["images_per_mm_step"]
    print(f"image decode + resize to 1024 px: {1000 * img:.1f} ms CPU per image; a multimodal step holds "
          f"{mm_images:.0f} images (demo data) = {mm_images * img:.1f} CPU s over the first-stage ranks")
    print(json.dumps({"bench": "planner_scale", "step_time_s": args.step_time, "before_commit": args.before,
                      "rows": rows, "image_ms": round(1000 * img, 2), "before_code": before["code"],
                      "after_code": after["code"]}))


if __name__ == "__main__":
    main()
