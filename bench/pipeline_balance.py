"""Pipeline balance on a realistic step mix: uniform vs multimodal-only vs mix-aware layer splits, side by side.

A run grouped by modality sees mostly text-only steps (no vision work in the first stage) and some multimodal
ones. Here: 7 text : 3 multimodal steps, packed rows (3 documents per row, document-causal attention; the
multimodal rows carry 0..IMAGES_PER_ROW images each), stage 2 (towers frozen, adaptor + LLM trained), 1F1B,
on a tiny model whose first stage is heavy on multimodal steps (SigLIP + SAM) and whose head costs about two
decoder layers (as at 7B: a 102400 x 4096 head against 4096-wide layers).

For pp = 2 and pp = 4, ONE torchrun launch (gloo, one thread per rank) builds three ``ParallelModel``s with
explicit ``parallel.layer_split`` lists, each running its own pipeline schedule on the same pp group:

* ``uniform``: the Megatron/torchtitan split;
* ``mm_only``: the previous ``auto``, balancing one multimodal step (``balance.partition_details``);
* ``mix``: the mix-aware ``auto`` (``pipeline_split_mix.partition_mix``) over this run's step types, the images per
  microbatch counted from the very rows the bench runs.

After a warm-up (one text and one multimodal step each), the splits run interleaved (A B C A B C ...); a
repeat is the same 10 steps (fixed order, 7 text and 3 multimodal) for every split; we time forward + backward
of the whole pipeline step (the optimizer step is not part of the cost model and is left out). Reported per
split: the median and min-max over repeats of the mean step time, the predicted expected step time
(``pipeline_split_mix.expected_step_time`` on the part costs, calibrated with ONE factor: the uniform run's measured /
predicted), and the prediction error. The part costs are measured on this machine first (``--costs measured``,
what ``vlpretrain plan --measure`` does; the default) or the FLOP model (``--costs flops``: its flat efficiency
overprices the large head against small CPU matmuls, so its splits are not the best ones here).

Two measurements, because this machine may have fewer cores than pipeline ranks: ``wall`` is the real step
time; ``busy`` is the step time of a machine with one core per rank, rebuilt from each rank's measured CPU time
(gloo waits block without spinning, so a rank's process CPU time per step is its compute): per step,
(n_mb + pp - 1) / n_mb x the busiest rank's CPU time, the 1F1B formula the cost model also uses. With
pp ranks on fewer cores the wall time of a balanced split is bounded by the total work / cores, which no
split changes; ``busy`` is what pp devices would see.

The last line is one JSON object (``bench/_ab.py``), headline pp = 2: ``ratio`` is the mix-aware split's
(``auto``'s) wall steps/s over the uniform split's, median over repeats, with the per-repeat min-max (the
splits of a repeat run back to back); every pp's record under ``settings``.

    python bench/pipeline_balance.py [--repeats 3] [--pp 2 4]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ab  # noqa: E402

MODEL = {  # heavy vision side; head ~ 2.8 decoder layers (vocab 4096 x dim 96); 8 layers: pp=4 has 2 per rank
    "name": "tiny-heavy-vision", "vocab_size": 4096, "dim": 96, "n_layers": 8, "n_heads": 4, "ffn_dim": 256,
    "max_seq_len": 256, "image_token_id": 2,
    "siglip": {"image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4},
    "sam": {"enabled": True, "image_size": 128, "patch_size": 8, "width": 128, "depth": 4, "heads": 4,
            "window_size": 8, "global_attn_indexes": [1, 3], "neck_chans": 64, "interp_size": 32,
            "downsample_channels": [96, 128], "hd_path": True},
}
IMAGES_PER_ROW = 2  # a multimodal packed row carries 0..2 images (64 tokens each) of its 160
ORDER = "TTMTTMTTMT"  # one repeat: 7 text, 3 multimodal steps, fixed order
LANGUAGE_SHARE = ORDER.count("T") / len(ORDER)
SPLITS = ("uniform", "mm_only", "mix")


def config(pp: int, split="uniform") -> dict:
    return {"model": MODEL,
            "train": {"stage": 2, "steps": 1, "global_batch_size": 16, "micro_batch_size": 2, "seq_len": 160,
                      "lr": 1e-4, "dtype": "fp32"},
            "data": {"packing": True, "document_causal": True, "group_by_modality": True,
                     "language_ratio": {"start": LANGUAGE_SHARE, "end": LANGUAGE_SHARE}},
            "parallel": {"dp": 1, "tp": 1, "pp": pp, "schedule": "1f1b", "layer_split": split}}


def steps_data(cfg) -> list[tuple[list, int]]:
    """The repeat's steps: packed rows, text steps without images, multimodal ones with 0..IMAGES_PER_ROW."""
    from vlpretrain.data.synthetic import synthetic_microbatches

    return [synthetic_microbatches(cfg, seed=100 + i, images_per_sample=IMAGES_PER_ROW if kind == "M" else 0,
                                   documents=3) for i, kind in enumerate(ORDER)]


def step_mix(cfg):
    """The run's step types from the bench's own rows: text share, images per microbatch of the multimodal."""
    from vlpretrain.data.step_mix import StepType

    it, tok = cfg.model.image_tokens, cfg.model.image_token_id
    images = tuple(int((mb.tokens == tok).sum()) // it
                   for (micro, _), kind in zip(steps_data(cfg), ORDER) if kind == "M" for mb in micro)
    note = f"counted from the bench's {ORDER.count('M')} multimodal steps"
    return [StepType("text", LANGUAGE_SHARE, (), note), StepType("multimodal", 1 - LANGUAGE_SHARE, images, note)]


def plan_splits(pp: int, costs: str = "measured") -> dict:
    """The three splits and each one's predicted expected step time, plus per-type predictions. ``costs``:
    "measured" times each part alone on this machine first (what ``vlpretrain plan --measure`` does: the FLOP
    model's flat efficiency misprices small CPU matmuls against the large head), "flops" uses the FLOP model
    (H100 peak, uncalibrated: only ratios matter). The multimodal-only and mix-aware splits use the same costs."""
    from vlpretrain.config import config_from_dict
    from vlpretrain.data.step_mix import StepType
    from vlpretrain.data.synthetic import synthetic_microbatches
    from vlpretrain.parallel.mesh import resolve_layout
    from vlpretrain.parallel.pipeline_split import partition_details, stage_style, uniform_split
    from vlpretrain.parallel.pipeline_split_mix import expected_step_time, mix_costs, partition_mix
    from vlpretrain.plan import measure_part_times

    cfg = config_from_dict(config(pp))
    mix = step_mix(cfg)
    n_mb = resolve_layout(cfg, pp).n_microbatches
    measured, ref_images = None, 1.0
    if costs == "measured":
        measured = measure_part_times(cfg, steps=5, images_per_sample=IMAGES_PER_ROW)
        (mb,), _ = synthetic_microbatches(cfg, 0, IMAGES_PER_ROW, num_samples=cfg.train.micro_batch_size)
        seen = int((mb.tokens == cfg.model.image_token_id).sum()) // cfg.model.image_tokens
        ref_images = max(seen, 1) / cfg.train.micro_batch_size  # the images the measured microbatch held
    type_times = [[c.time_s for c in cs] for cs in mix_costs(cfg, mix, measured, ref_images)]
    shares = [st.share for st in mix]
    mean_per_mb = round(sum(mix[1].images) / len(mix[1].images))
    # the previous auto: one multimodal step at the data's mean images (per microbatch here)
    mm_times = [c.time_s for c in mix_costs(cfg, [StepType("multimodal", 1.0, (mean_per_mb,), "")], measured,
                                            ref_images)[0]]
    splits = {
        "uniform": uniform_split(cfg.model.n_layers, pp),
        "mm_only": partition_details(mm_times, pp, pp, stage_style("1f1b"))["split"],
        "mix": partition_mix(type_times, shares, pp, pp, "1f1b", n_mb)["split"],
    }
    pred = {name: {"expected": expected_step_time(s, type_times, shares, pp, "1f1b", n_mb),
                   "by_type": {st.name: expected_step_time(s, [tt], [1.0], pp, "1f1b", n_mb)
                               for st, tt in zip(mix, type_times)}}
            for name, s in splits.items()}
    layer = type_times[1][1]
    return {"splits": splits, "pred": pred, "n_mb": n_mb, "images_per_mb": list(mix[1].images),
            "embed_over_layer": type_times[1][0] / layer, "head_over_layer": type_times[1][-1] / layer}


def worker(spec_path: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from vlpretrain.config import config_from_dict
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import init_parallel

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    pp, repeats = spec["pp"], spec["repeats"]
    models = {}
    for name in SPLITS:
        cfg = config_from_dict(config(pp, spec["splits"][name]))
        models[name] = ParallelModel(cfg, init_parallel(cfg, torch.device("cpu")))
    steps = steps_data(cfg)
    rank = dist.get_rank()

    def run(model, step) -> tuple[float, float]:
        c0 = time.process_time()
        micro, n = step
        model.forward_backward(micro, n)  # ends in an all-reduce over pp: the ranks leave it together
        for p in model.trainable_parameters():
            p.grad = None
        return time.process_time() - c0

    for model in models.values():  # warm-up: pipeline shape inference, allocator, one step of each kind
        for i in (ORDER.index("T"), ORDER.index("M")):
            run(model, steps[i])
    wall = {n: [] for n in SPLITS}
    busy = {n: [] for n in SPLITS}  # [repeat][step]: this rank's CPU seconds
    for _ in range(repeats):
        for name, model in models.items():
            dist.barrier()
            t0 = time.perf_counter()
            busy[name].append([run(model, s) for s in steps])
            dist.barrier()
            wall[name].append((time.perf_counter() - t0) / len(steps))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"pp_rank": rank, "wall": wall, "busy": busy}))
    dist.destroy_process_group()


def launch(pp: int, splits: dict, repeats: int, tmp: Path) -> list[dict]:
    run = tmp / f"pp{pp}"
    run.mkdir()
    (run / "spec.json").write_text(json.dumps({"pp": pp, "splits": splits, "repeats": repeats}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={pp}", __file__,
           "--worker", str(run / "spec.json"), str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        sys.exit(f"bench failed (pp={pp}):\n{proc.stderr[-4000:]}")
    return sorted((json.loads(p.read_text()) for p in run.glob("rank*.json")), key=lambda r: r["pp_rank"])


def analyse(pp: int, plan: dict, ranks: list[dict]) -> dict:
    n_mb = plan["n_mb"]
    fill = (n_mb + pp - 1) / n_mb
    res = {}
    for name in SPLITS:
        wall = ranks[0]["wall"][name]
        # per repeat: mean over its steps of fill x the busiest rank's CPU time of that step
        busy = [statistics.mean(fill * max(r["busy"][name][rep][i] for r in ranks) for i in range(len(ORDER)))
                for rep in range(len(wall))]
        # per rank: median over repeats of its mean CPU time on text / multimodal steps
        rank_busy = {kind: [statistics.median(statistics.mean(x for x, k in zip(rep, ORDER) if k == kind)
                                              for rep in r["busy"][name]) for r in ranks] for kind in "TM"}
        res[name] = {"wall_list": wall, "busy_list": busy, "split": plan["splits"][name],
                     "wall": _ab.summarize(wall), "busy": _ab.summarize(busy), "rank_busy": rank_busy}
    for what in ("wall", "busy"):
        calib = res["uniform"][what]["median"] / plan["pred"]["uniform"]["expected"]
        for name in SPLITS:
            p = plan["pred"][name]["expected"] * calib
            res[name][f"{what}_pred"] = p
            res[name][f"{what}_err"] = p / res[name][what]["median"] - 1
    return res


def report(pp: int, plan: dict, res: dict) -> dict:
    print(f"\npp={pp}: {plan['n_mb']} microbatches of 2 x 160 packed tokens, 1F1B, stage 2; steps {ORDER} "
          f"(T text, M multimodal); images per multimodal microbatch {plan['images_per_mb']}; cost model: "
          f"multimodal embed = {plan['embed_over_layer']:.2f} layers, head = {plan['head_over_layer']:.2f}")
    print(f"  {'split':<8}{'layers':<15}{'what':<6}{'mean step s (min-max)':>24}{'predicted':>11}{'error':>8}"
          f"   CPU s/step per rank: text (wall row), multimodal (busy row)")
    for name in SPLITS:
        r = res[name]
        for what in ("wall", "busy"):
            s = r[what]
            head = f"{name:<8}{str(r['split']):<15}" if what == "wall" else " " * 23
            ranks = " ".join(f"{x:.3f}" for x in r["rank_busy"]["T" if what == "wall" else "M"])
            print(f"  {head}{what:<6}{s['median']:>9.3f} ({s['min']:.3f}-{s['max']:.3f})"
                  f"{r[what + '_pred']:>11.3f}{r[what + '_err'] * 100:>+7.1f}%   {ranks}")
    # the harness's view: per split and repeat, steps/s (wall) and steps/s of one core per rank (busy)
    per = {n: [{"steps_per_s": 1 / w, "busy_steps_per_s": 1 / b} for w, b in zip(res[n]["wall_list"],
                                                                              res[n]["busy_list"])] for n in SPLITS}
    got = {}
    for what, key in (("wall", "steps_per_s"), ("busy", "busy_steps_per_s")):
        # ratios > 1: the mix-aware split is faster
        vs_u = _ab.compare(_ab.column(per, "mix", key), _ab.column(per, "uniform", key))
        vs_m = _ab.compare(_ab.column(per, "mix", key), _ab.column(per, "mm_only", key))
        r = {"mix_vs_uniform": round(vs_u["ratio"], 3), "mix_vs_mm_only": round(vs_m["ratio"], 3),
             "mix_vs_mm_only_min": round(vs_m["ratio_min"], 3), "mix_vs_mm_only_max": round(vs_m["ratio_max"], 3),
             "pred_err": round(max(abs(res[n][what + "_err"]) for n in SPLITS), 3)}
        r["goal_met"] = r["mix_vs_uniform"] >= 1 and r["mix_vs_mm_only"] >= 1 and r["pred_err"] <= 0.15
        print(f"  {what}: uniform / mix = {r['mix_vs_uniform']:.3f} (per-repeat {vs_u['ratio_min']:.3f}-"
              f"{vs_u['ratio_max']:.3f}), mm_only / mix = {r['mix_vs_mm_only']:.3f} (per-repeat "
              f"{vs_m['ratio_min']:.3f}-{vs_m['ratio_max']:.3f}), largest prediction error {r['pred_err'] * 100:.1f}%")
        got[what] = r
    # headline ("ratio"): the real (wall) steps/s of the mix-aware split ("auto") over the uniform one; the
    # one-core-per-rank rebuild under "busy"
    wall = got["wall"]
    rec = _ab.record("pipeline_balance", {"pp": pp}, per, "mix", "uniform", "steps_per_s", goal=1.0,
                     mix_vs_mm_only=wall["mix_vs_mm_only"], mix_vs_mm_only_min=wall["mix_vs_mm_only_min"],
                     mix_vs_mm_only_max=wall["mix_vs_mm_only_max"], pred_err=wall["pred_err"],
                     all_goals_met=wall["goal_met"], splits={n: res[n]["split"] for n in SPLITS}, busy=got["busy"])
    print("  " + _ab.ratio_line(rec))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--costs", choices=["measured", "flops"], default="measured",
                    help="part costs the splits and predictions use (measured here, or the FLOP model)")
    args = ap.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as d:
        for pp in args.pp:
            plan = plan_splits(pp, args.costs)
            ranks = launch(pp, plan["splits"], args.repeats, Path(d))
            records.append(report(pp, plan, analyse(pp, plan, ranks)) | {"cores": os.cpu_count(), "costs": args.costs})
    # headline: pp = 2 when run (the README's and the setting)
    _ab.emit(records, headline=next((i for i, r in enumerate(records) if r["pp"] == 2), 0))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
