"""DeepSeek-VL at the paper's scale, planned: the three stages of the 7B on 64 x 8 A100 and of the 1.3B on 16 x 8
A100 (Table 4's steps, batches and sequence lengths, from configs/deepseek-vl-*/stage*.yaml), each stage's best
layout and predicted days, the total next to the paper's 5 and 7 days; and the 7B stage 2 on 64 x 8 H100.

    python bench/paper_scale_plan.py [--gpu a100-80gb] [--json]

Pure arithmetic (meta-device parameter counts, the fitted cost model, the assumed step mix: the data is not
read). The paper does not say which A100 (40 or 80 GB) or network; the preset is a100-80gb unless --gpu says.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.config import load_config  # noqa: E402
from vlpretrain.planning.cluster import get_cluster  # noqa: E402
from vlpretrain.planning.search import describe, search  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER_DAYS = {"deepseek-vl-7b": (512, 5.0), "deepseek-vl-1.3b": (128, 7.0)}


def plan_model(name: str, world: int, gpu: str) -> dict:
    stages = []
    for stage in (1, 2, 3):
        cfg = load_config(REPO / f"configs/{name}/stage{stage}.yaml")
        res = search(cfg, world, get_cluster(gpu), top=3)
        best = res["best"]
        days = cfg.train.steps * best["step_time_s"] / 86400
        stages.append({"stage": stage, "steps": cfg.train.steps, "global_batch": cfg.train.global_batch_size,
                       "seq_len": cfg.train.seq_len, "layout": describe(best), "layer_split": best["layer_split"],
                       "step_time_s": round(best["step_time_s"], 3), "mfu": round(best["mfu"], 3),
                       "memory_gib": round(best["memory_gib"], 1), "days": round(days, 2),
                       "search_seconds": res["search_seconds"]})
    return {"model": name, "gpus": world, "gpu": gpu, "stages": stages,
            "total_days": round(sum(s["days"] for s in stages), 2), "paper_days": PAPER_DAYS[name][1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="a100-80gb")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = [plan_model(name, world, args.gpu) for name, (world, _) in PAPER_DAYS.items()]
    h100 = search(load_config(REPO / "configs/deepseek-vl-7b/stage2.yaml"), 512, get_cluster("h100-sxm"), top=5)
    if not args.json:
        for m in out:
            print(f"{m['model']} on {m['gpus']} x {m['gpu']}: predicted {m['total_days']:.1f} days "
                  f"(paper: {m['paper_days']:g})")
            for s in m["stages"]:
                print(f"  stage {s['stage']}: {s['steps']} steps x {s['global_batch']} x {s['seq_len']}: {s['layout']} "
                      f"{s['layer_split']}: {s['step_time_s']:.3f} s/step, MFU {s['mfu']:.2f}, "
                      f"{s['memory_gib']:.1f} GiB -> {s['days']:.2f} days")
        print("deepseek-vl-7b stage 2 on 512 x h100-sxm, top 5:")
        for row in h100["top"]:
            print(f"  {describe(row)} {row['layer_split']}: {row['step_time_s']:.3f} s/step, "
                  f"{row['tokens_per_s_per_gpu']:.0f} tok/s/GPU, MFU {row['mfu']:.2f}, {row['memory_gib']:.1f} GiB"
                  + (f"  ({row['why_not_best']})" if row.get("why_not_best") else ""))
    summary = {"a100": out, "h100_7b_stage2_top": [{k: row[k] for k in ("tp", "pp", "vpp", "dp", "micro_batch_size",
                                                                        "schedule", "activation_checkpointing",
                                                                        "layer_split", "step_time_s", "mfu",
                                                                        "memory_gib")} for row in h100["top"]],
               "h100_search_seconds": h100["search_seconds"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
