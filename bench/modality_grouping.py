"""Modality-grouped vs mixed global batches: training throughput on the tiny hybrid model, same samples.

The paper (Figure 7) reports +20% training efficiency from making every global step all-language or
all-multimodal: a mixed batch waits for its slowest (image) samples on every rank, and every microbatch pays
for the vision encoders. This runs ``vlpretrain train`` (the real data path, demo data) under torchrun at
dp = 1 and dp = 2, with ``data.group_by_modality`` true (grouped) and false (mixed), launches interleaved
grouped, mixed, grouped, mixed ... (``bench/_ab.py``), and reports sequences/s and samples/s over the timed
steps of each launch (the first ``--warmup-steps`` of a launch are not timed).

Same work in both: a mixed step draws each slot's source by weight, a grouped step draws its modality from the
language share (0.7) and then the source by weight within it. The bench sets the source weights to 112 text :
18 interleaved : 18 captions : 6 ocr : 6 sft (per 160 slots = 10 steps of 16), so over every 10 steps both runs
draw exactly 112 text and 48 multimodal samples with the same count per source (the quota method hits the
weights exactly at those counts) and, since a source's draws follow its own shuffled order, the SAME samples.
That needs one sample per row (``data.packing: false``, the default here) and step counts that are multiples
of 10; the counts (text, multimodal samples and images of the timed steps) are read back from metrics.jsonl,
printed and checked. ``--packing`` packs rows as stage 2 does; the planner then fills rows differently in the
two runs, so the counts differ (printed, and ``same_samples`` is false in the JSON line).

    python bench/modality_grouping.py [--steps 10] [--warmup-steps 10] [--dp 1 2] [--repeats 3] [--packing]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ab  # noqa: E402

GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN, LANGUAGE_SHARE = 16, 4, 128, 0.7
# per 160 slots: 0.7 text, and the multimodal sources in the tiny config's proportions, rounded so that each
# one's count over 48 multimodal slots (grouped) and over 160 slots (mixed) is a whole number
SOURCES = [("interleaved", "shards/interleaved-*.tar", "multimodal", 18),
           ("captions", "shards/captions-*.tar", "multimodal", 18),
           ("ocr", "shards/ocr-*.tar", "multimodal", 6),
           ("sft", "shards/sft-*.tar", "multimodal", 6),
           ("text", "corpus/text", "text", 112)]
PERIOD = 10  # steps after which both runs' per-source counts are exact


def sources_override() -> str:
    items = ", ".join(f"{{name: {n}, path: '{p}', modality: {m}, weight: {w}}}" for n, p, m, w in SOURCES)
    return f"data.sources=[{items}]"


def run(dp: int, grouped: bool, warmup_steps: int, steps: int, packing: bool, data: Path, out: Path) -> dict:
    """One launch; figures over its timed steps."""
    if out.exists():
        for f in out.glob("*"):
            if f.is_file():
                f.unlink()
    sets = [f"data.root={data}", f"train.run_dir={out}", "train.init_from=", "train.eval_file=", "train.eval_text=",
            f"train.steps={warmup_steps + steps}", f"train.global_batch_size={GLOBAL_BATCH}",
            f"train.micro_batch_size={MICRO_BATCH}", f"train.seq_len={SEQ_LEN}", "train.warmup_steps=0",
            f"data.group_by_modality={str(grouped).lower()}", f"data.packing={str(packing).lower()}",
            f"data.language_ratio.start={LANGUAGE_SHARE}", f"data.language_ratio.end={LANGUAGE_SHARE}",
            "data.language_ratio.warmup_steps=0", sources_override(), "logging.log_interval=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp}"]
    cmd = launcher + ["-m", "vlpretrain", "train", "--config", str(ROOT / "configs/tiny/stage2.yaml"), "--set", *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train failed (dp={dp}, grouped={grouped}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r and r["step"] > warmup_steps]
    if len(rows) != steps:
        sys.exit(f"expected {steps} timed steps in {out / 'metrics.jsonl'}, found {len(rows)}")
    seconds = sum(r["step_time_s"] for r in rows)
    counts: dict[str, int] = {}
    for r in rows:
        for k, v in r["source_counts"].items():
            counts[k] = counts.get(k, 0) + v
    text = sum(v for k, v in counts.items() if k == "text")
    samples = sum(counts.values())
    return {"seq_per_s": GLOBAL_BATCH * steps / seconds, "samples_per_s": samples / seconds, "step_s": seconds / steps,
            "text_samples": text, "mm_samples": samples - text, "images": sum(r["images"] for r in rows),
            "text_steps": sum(r["modality"] == "text" for r in rows), "source_counts": counts}


def work(figs: dict) -> tuple:
    return figs["text_samples"], figs["mm_samples"], figs["images"], tuple(sorted(figs["source_counts"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help=f"timed steps per launch (a multiple of {PERIOD})")
    ap.add_argument("--warmup-steps", type=int, default=10, help=f"untimed steps first (a multiple of {PERIOD})")
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--packing", action="store_true", help="pack rows (the counts then differ between the runs)")
    _ab.add_args(ap, repeats=3, warmup=0)  # every launch already discards its warm-up steps
    args = ap.parse_args()
    if not args.packing and (args.steps % PERIOD or args.warmup_steps % PERIOD):
        ap.error(f"--steps and --warmup-steps must be multiples of {PERIOD} for equal samples")
    from data_tools import generate_demo

    records = []
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data"
        generate_demo(data, seed=0, scale=0.2, verbose=False)
        print(f"tiny hybrid model, stage 2, {GLOBAL_BATCH} x {SEQ_LEN} tokens per step, micro-batch {MICRO_BATCH}, "
              f"packing {args.packing}, language share {LANGUAGE_SHARE}; {args.warmup_steps} untimed + {args.steps} "
              f"timed steps per launch; launches interleaved, {args.warmup} warm-up round(s), {args.repeats} repeats",
              flush=True)
        for dp in args.dp:
            variants = {name: (lambda g=g, name=name, dp=dp: run(dp, g, args.warmup_steps, args.steps, args.packing,
                                                                 data, Path(d) / f"dp{dp}_{name}"))
                        for name, g in (("grouped", True), ("mixed", False))}
            res = _ab.interleave(variants, args.repeats, args.warmup, log=lambda s: print(s, flush=True))
            per = {name: {work(f) for f in figs} for name, figs in res.items()}
            same = len(per["grouped"]) == 1 and per["grouped"] == per["mixed"]
            print(f"\ndp={dp}: work per launch (timed steps):")
            for name, figs in res.items():
                f = figs[0]
                print(f"  {name:<8} text samples {f['text_samples']}, multimodal samples {f['mm_samples']}, "
                      f"images {f['images']}, text steps {f['text_steps']}/{args.steps}, per source "
                      f"{dict(sorted(f['source_counts'].items()))}")
            print(f"  same samples in both: {'yes' if same else 'NO'}")
            print(_ab.table(res, ["seq_per_s", "samples_per_s", "step_s"]))
            f = res["grouped"][0]
            rec = _ab.record("modality_grouping", {"dp": dp}, res, "grouped", "mixed", "seq_per_s",
                             goal=1.2 if dp > 1 else 1.0, samples_per_s_ratio=round(_ab.compare(
                                 _ab.column(res, "grouped", "samples_per_s"),
                                 _ab.column(res, "mixed", "samples_per_s"))["ratio"], 4),
                             same_samples=same, text_samples=f["text_samples"], mm_samples=f["mm_samples"],
                             images=f["images"], steps=args.steps, packing=args.packing)
            print(_ab.ratio_line(rec), flush=True)
            records.append(rec)
    _ab.emit(records)


if __name__ == "__main__":
    main()
