"""Predicted gain of balanced steps (``data.balance: rows``) at scale, from the planner and the FLOP model.

No training: for the 7B and 1.3B configs at ``--dp`` (default 128) data-parallel replicas, the run's own
``StepPlanner`` plans ``--steps`` global steps on the demo data (its samples and images, the real models' 576
tokens per image and 4096-token rows), and ``data/placement.py`` places each step's rows contiguously and
balanced, as the config's layout would (the 7B's pp = 4: the pipelined placement; the 1.3B's pp = 1: lockstep),
with the row costs of ``pipeline_cost.row_cost`` (forward + backward FLOPs of one replica: images through the
towers, decoder per row position, attention per document, the head per position or per supervised token). Three
replica models: the sum of its microbatches' costs; lockstep (microbatch k of every replica waits for the slot's
most vision work and its most decoder work: FSDP's collectives without a pipeline); and a pipelined one for pp >
1: stage 0 runs the towers and a share f of the decoder chosen so that it equals each other stage for the mean
microbatch (as ``layer_split: auto`` balances for the mix), each microbatch takes its slowest stage's time, plus
(pp - 1) x the slowest microbatch for the fill and drain. A step takes its slowest replica's time (the sum and
pipelined models).

Reported per setting: the mean slowest / mean replica sum (imbalance) under each placement, the predicted gain
in steps/s of balanced over contiguous under each model (sum of the steps' times, contiguous / balanced), the
median time to plan and to place a step (one core), and for stage 2 grouped over mixed: the efficiency (useful
FLOPs, no blank images, / the replicas' predicted time) ratio, contiguous and balanced, since the two draw the
same mixture but not the same steps.

Settings, per model size: stage 2 (packed, modality-grouped, language share 0.7) and the same mixed; stage 3
(mixed SFT, unpacked, multimodal SFT 52.1 : text 47.9 as Table 2).

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


def _config(demo: Path, tok, size: str, stage: int, grouped: bool):
    from vlpretrain.config import load_config

    return load_config(ROOT / "configs" / f"deepseek-vl-{size}" / f"stage{stage}.yaml", [
        f"model.image_token_id={tok.image_id}", f"data.root={demo}", "data.manifest=",
        f"data.sources={STAGE2 if stage == 2 else STAGE3}", "train.init_from=", "train.eval_file=",
        "data.num_workers=0", f"data.group_by_modality={str(grouped).lower()}",
        "data.language_ratio={start: 0.7, end: 0.7, warmup_steps: 0, shape: linear}"])


def simulate(cfg, tok, dp: int, steps: int) -> dict:
    import numpy as np

    from vlpretrain.data.placement import place, row_features
    from vlpretrain.data.step_plan import StepPlanner
    from vlpretrain.parallel.pipeline_cost import row_cost

    planner, cost, mbs = StepPlanner(cfg, tok), row_cost(cfg), cfg.train.micro_batch_size
    pp = cfg.parallel.pp
    per = {"rows": [], "none": []}  # per step: (vision, decoder) cost of every microbatch, (dp, n_mb) arrays
    useful, samples, t_plan, t_place = 0.0, 0, [], []
    for _ in range(steps):
        t0 = time.process_time()
        plan = planner.plan()
        t1 = time.process_time()
        at = place(plan, dp, mbs, cost, pipelined=pp > 1)
        t_place.append(time.process_time() - t1)
        t_plan.append(t1 - t0)
        feats = row_features(plan, cost)
        images, decoder = feats.images, feats.decoder
        useful += float(cost.image * images.sum() + decoder.sum())  # no blank images
        samples += len(plan.table)
        n = len(plan.rows) // dp
        for name, rows in (("rows", at.rows), ("none", [list(range(r * n, (r + 1) * n)) for r in range(dp)])):
            idx = np.asarray(rows).reshape(dp, -1, mbs)
            im = images[idx].sum(axis=2)
            enc = np.maximum(1, -(-im // cost.tp)) if plan.modality != "text" else np.zeros_like(im)
            per[name].append((cost.image * enc, decoder[idx].sum(axis=2)))
    # pipelined replica: stage 0 runs the towers and a share f of the decoder, chosen (as layer_split: auto
    # does for the mix) so that it equals each other stage for the mean microbatch
    v_mean = float(np.mean([v.mean() for v, _ in per["none"]]))
    d_mean = float(np.mean([d.mean() for _, d in per["none"]]))
    f = min(max((d_mean / (pp - 1) - v_mean) / (d_mean * pp / (pp - 1)), 0.0), 1.0) if pp > 1 else 1.0
    out = {"plan_s": statistics.median(t_plan), "place_s": statistics.median(t_place), "samples": samples,
           "stage0_decoder_share": f}
    for name, steps_ in per.items():
        flat, piped, lockstep, imb = 0.0, 0.0, 0.0, []
        for v, d in steps_:
            rank = (v + d).sum(axis=1)
            flat += float(rank.max())
            lockstep += float(v.max(axis=0).sum() + d.max(axis=0).sum())
            imb.append(float(rank.max() / rank.mean()))
            if pp > 1:
                stage = np.maximum(v + f * d, (1 - f) * d / (pp - 1))  # the slowest stage per microbatch
                piped += float((stage.sum(axis=1) + (pp - 1) * stage.max(axis=1)).max())
        out[f"imbalance_{name}"] = statistics.fmean(imb)
        out[f"imbalance_{name}_max"] = max(imb)
        out[f"time_{name}"] = flat
        out[f"efficiency_{name}"] = useful / (dp * flat)  # useful work / (replicas x the slowest one's time)
        out[f"time_lockstep_{name}"] = lockstep
        out[f"efficiency_lockstep_{name}"] = useful / (dp * lockstep)
        if pp > 1:
            out[f"time_pp_{name}"] = piped
            out[f"efficiency_pp_{name}"] = useful / (dp * pp * piped)
    out["gain"] = out["time_none"] / out["time_rows"]
    out["gain_lockstep"] = out["time_lockstep_none"] / out["time_lockstep_rows"]
    if pp > 1:
        out["gain_pp"] = out["time_pp_none"] / out["time_pp_rows"]
    return out


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
        for size in ("7b", "1.3b"):
            for name, stage, grouped in (("stage2_grouped", 2, True), ("stage2_mixed", 2, False),
                                         ("stage3_mixed", 3, False)):
                res[f"{size}_{name}"] = simulate(_config(demo, tok, size, stage, grouped), tok, args.dp, args.steps)
    print(f"dp={args.dp} replicas, {args.steps} planned steps per setting, demo data; predicted from FLOPs. Gain: "
          "steps/s balanced / contiguous, replicas as sums, in lockstep (pp = 1: the 1.3B) and pipelined (the 7B)")
    print(f"{'setting':<20}{'imbalance none':>15}{'(worst)':>9}{'imbalance rows':>15}{'gain':>8}{'gain lockstep':>14}"
          f"{'gain pp':>9}{'plan s':>8}{'place s':>9}")
    for name, r in res.items():
        print(f"{name:<20}{r['imbalance_none']:>15.4f}{r['imbalance_none_max']:>9.4f}{r['imbalance_rows']:>15.4f}"
              f"{r['gain']:>8.4f}{r['gain_lockstep']:>14.4f}{r.get('gain_pp', float('nan')):>9.4f}"
              f"{r['plan_s']:>8.3f}{r['place_s']:>9.4f}")
    grouping = {}
    for size, model in (("7b", "pp_"), ("1.3b", "lockstep_")):
        g, m = res[f"{size}_stage2_grouped"], res[f"{size}_stage2_mixed"]
        grouping.update({f"{size}_{k or 'flat_'}{b}": g[f"efficiency_{k}{b}"] / m[f"efficiency_{k}{b}"]
                         for k in ("", model) for b in ("none", "rows")})
    print("stage 2, grouped / mixed efficiency (useful FLOPs / predicted time): " + ", ".join(
        f"{k} {v:.4f}" for k, v in grouping.items()))
    print(json.dumps({"bench": "step_balance_scale", "dp": args.dp, "steps": args.steps, **res,
                      "grouped_over_mixed": grouping}))


if __name__ == "__main__":
    main()
