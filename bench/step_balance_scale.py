"""Predicted gain of balanced steps (``data.balance: rows``) at scale, from the planner and the FLOP model.

No training: for the 7B configs at ``--dp`` (default 128) data-parallel replicas, the run's own
``StepPlanner`` plans ``--steps`` global steps on the demo data (its samples and images, the 7B's 576 tokens per
image and 4096-token rows), and ``data/placement.py`` places each step's rows contiguously and balanced, with
the row costs of ``pipeline_cost.row_cost`` (forward + backward FLOPs of one replica: images through the towers,
decoder and head per row position, attention per document). A replica's predicted time is the sum of its
microbatches' costs (the pipeline inside a replica is not modelled); a step's is its slowest replica's.

Reported per setting: the mean slowest / mean replica cost (imbalance) under each placement, the predicted
steps/s gain of balanced over contiguous (sum of the steps' slowest-replica costs, contiguous / balanced), the
mean time to place a step next to planning it (one core), and for stage 2 grouped vs mixed (both balanced and
both contiguous): samples per predicted second, since the two draw the same mixture but not the same steps.

Settings: 7B stage 2 (packed 2304 x 4096, modality-grouped, language share 0.7) and the same mixed; 7B stage 3
(mixed SFT, unpacked 256 x 4096, multimodal SFT 52.1 : text 47.9 as Table 2).

    python bench/step_balance_scale.py [--dp 128] [--steps 40] [--demo DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE2 = ("[{name: interleaved, path: 'shards/interleaved-*.tar', modality: multimodal, weight: 15.2}, "
          "{name: captions, path: 'shards/captions-*.tar', modality: multimodal, weight: 11.1}, "
          "{name: ocr, path: 'shards/ocr-*.tar', modality: multimodal, weight: 3.0}, "
          "{name: sft, path: 'shards/sft-*.tar', modality: multimodal, weight: 4.0}, "
          "{name: text, path: corpus/text, modality: text, weight: 70.0}]")
STAGE3 = ("[{name: sft, path: 'shards/sft-*.tar', modality: multimodal, weight: 52.1}, "
          "{name: text, path: corpus/text, modality: text, weight: 47.9}]")


def _config(demo: Path, tok, stage: int, grouped: bool):
    from vlpretrain.config import load_config

    return load_config(ROOT / "configs" / "deepseek-vl-7b" / f"stage{stage}.yaml", [
        f"model.image_token_id={tok.image_id}", f"data.root={demo}", "data.manifest=",
        f"data.sources={STAGE2 if stage == 2 else STAGE3}", "train.init_from=", "train.eval_file=",
        "data.num_workers=0", f"data.group_by_modality={str(grouped).lower()}",
        "data.language_ratio={start: 0.7, end: 0.7, warmup_steps: 0, shape: linear}"])


def simulate(cfg, tok, dp: int, steps: int) -> dict:
    from vlpretrain.data.placement import place
    from vlpretrain.data.step_plan import StepPlanner
    from vlpretrain.parallel.pipeline_cost import row_cost

    planner, cost, mbs = StepPlanner(cfg, tok), row_cost(cfg), cfg.train.micro_batch_size
    worst = {"rows": [], "none": []}
    imb = {"rows": [], "none": []}
    samples, t_plan, t_place = 0, [], []
    for _ in range(steps):
        t0 = time.process_time()
        plan = planner.plan()
        t1 = time.process_time()
        at = place(plan, dp, mbs, cost)
        t_place.append(time.process_time() - t1)
        t_plan.append(t1 - t0)
        samples += len(plan.table)
        for name, costs in (("rows", at.rank_cost), ("none", at.rank_cost_contiguous)):
            worst[name].append(max(costs))
            imb[name].append(max(costs) / statistics.fmean(costs))
    return {"imbalance_rows": statistics.fmean(imb["rows"]), "imbalance_none": statistics.fmean(imb["none"]),
            "imbalance_none_max": max(imb["none"]), "gain": sum(worst["none"]) / sum(worst["rows"]),
            "samples_per_flop_rows": samples / sum(worst["rows"]),
            "samples_per_flop_none": samples / sum(worst["none"]),
            "plan_s": statistics.median(t_plan), "place_s": statistics.median(t_place), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--demo", type=Path, help="demo data made by `python -m data_tools demo` (default: made now)")
    args = ap.parse_args()
    import torch

    from vlpretrain.data.tokenizer import TextTokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo
        if demo is None:
            from data_tools import generate_demo

            demo = Path(tmp) / "demo"
            generate_demo(demo, seed=0, scale=0.2, verbose=False)
        tok = TextTokenizer(demo / "tokenizer.json")
        res = {}
        for name, stage, grouped in (("stage2_grouped", 2, True), ("stage2_mixed", 2, False),
                                     ("stage3_mixed", 3, False)):
            res[name] = simulate(_config(demo, tok, stage, grouped), tok, args.dp, args.steps)
    print(f"7B, dp={args.dp} replicas, {args.steps} planned steps per setting, demo data; predicted from FLOPs")
    print(f"{'setting':<16}{'imbalance none':>16}{'(worst)':>9}{'imbalance rows':>16}{'gain rows/none':>16}"
          f"{'plan s':>9}{'place s':>9}")
    for name, r in res.items():
        print(f"{name:<16}{r['imbalance_none']:>16.4f}{r['imbalance_none_max']:>9.4f}{r['imbalance_rows']:>16.4f}"
              f"{r['gain']:>16.4f}{r['plan_s']:>9.3f}{r['place_s']:>9.4f}")
    g, m = res["stage2_grouped"], res["stage2_mixed"]
    grouping = {"contiguous": g["samples_per_flop_none"] / m["samples_per_flop_none"],
                "balanced": g["samples_per_flop_rows"] / m["samples_per_flop_rows"]}
    print(f"stage 2, grouped / mixed samples per predicted second: contiguous {grouping['contiguous']:.4f}, "
          f"balanced {grouping['balanced']:.4f}")
    print(json.dumps({"bench": "step_balance_scale", "dp": args.dp, "steps": args.steps, **res,
                      "grouped_over_mixed": grouping}))


if __name__ == "__main__":
    main()
