"""The pipeline timeline of a profiled window (``profile/blocks_rank*.json``, written by train/profiling.py):
one row per rank, a block per stage computation (forward, backward, input-/weight-gradient for zero-bubble
schedules, loss), gaps are idle time; plus the measured bubble fraction beside the schedule's theoretical one.

Bubble fraction of a step: over the pipeline's span (first computation start to last computation end over
all ranks), the share of rank-time not spent computing, averaged over ranks (the textbook definition behind
(pp-1)/(m+pp-1)). The figure and ``bubble.json`` give the mean over the profiled steps and each step's value.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vlpretrain.layout_rules import theoretical_bubble

KINDS = {"F": ("forward", "#4c72b0"), "B": ("backward", "#dd8452"), "I": ("backward (input grad)", "#c44e52"),
         "W": ("backward (weight grad)", "#8172b3"), "L": ("loss", "#55a868")}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def measure(ranks: list[dict]) -> dict:
    """Per profiled step: the pipeline span and its bubble fraction over ``ranks`` (blocks_rank*.json)."""
    steps = sorted({s[0] for r in ranks for s in r["steps"]})
    per_step = []
    for step in steps:
        spans = {}
        for r in ranks:
            rng = next((s for s in r["steps"] if s[0] == step), None)
            if rng is None:
                continue
            spans[r["rank"]] = [(b[3], b[4]) for b in r["blocks"] if rng[1] <= b[3] <= rng[2]]
        blocks = [iv for ivs in spans.values() for iv in ivs]
        if not blocks:
            continue
        t0, t1 = min(a for a, _ in blocks), max(b for _, b in blocks)
        busy = [_union(ivs) for ivs in spans.values()]
        per_step.append({"step": step, "span_ms": (t1 - t0) / 1e3,
                         "bubble": 1.0 - sum(busy) / (len(spans) * (t1 - t0)) if t1 > t0 else 0.0})
    return {"steps": per_step,
            "measured": float(np.mean([s["bubble"] for s in per_step])) if per_step else None}


def load_ranks(profile_dir: Path) -> list[dict]:
    ranks = [json.loads(p.read_text()) for p in sorted(Path(profile_dir).glob("blocks_rank*.json"))]
    return sorted(ranks, key=lambda r: r["rank"])


def draw_timeline(profile_dir: str | Path) -> dict:
    """``profile_dir/timeline.png`` and ``bubble.json`` from the ranks' block files; returns bubble.json."""
    profile_dir = Path(profile_dir)
    ranks = load_ranks(profile_dir)
    if not ranks:
        raise FileNotFoundError(f"no blocks_rank*.json under {profile_dir}")
    meta = ranks[0]
    m = measure(ranks)
    theory = theoretical_bubble(meta["schedule"], meta["pp"], meta["vpp"], meta["microbatches"])
    result = {"schedule": meta["schedule"], "pp": meta["pp"], "vpp": meta["vpp"], "dp": meta["dp"],
              "tp": meta["tp"], "microbatches": meta["microbatches"], "measured": m["measured"],
              "theoretical": theory, "per_step": m["steps"], "device_time": any(r.get("device") for r in ranks),
              "png": str(profile_dir / "timeline.png")}
    _draw(ranks, result, profile_dir / "timeline.png")
    (profile_dir / "bubble.json").write_text(json.dumps(result, indent=1))
    return result


def _draw(ranks: list[dict], result: dict, png: Path) -> None:
    starts = [s[1] for r in ranks for s in r["steps"]] + [b[3] for r in ranks for b in r["blocks"]]
    ends = [s[2] for r in ranks for s in r["steps"]] + [b[4] for r in ranks for b in r["blocks"]]
    origin = min(starts) if starts else 0.0
    width_ms = (max(ends) - origin) / 1e3 if ends else 1.0
    n = len(ranks)
    fig = Figure(figsize=(13, 1.2 + 0.75 * n), dpi=100, layout="constrained")
    ax = fig.subplots()
    for row, r in enumerate(ranks):
        y = n - 1 - row  # rank 0 on top
        for step, a, b in r["steps"]:  # the whole step (optimizer included): a light background
            ax.broken_barh([((a - origin) / 1e3, (b - a) / 1e3)], (y - 0.45, 0.9), color="0.93", zorder=0)
            if row == 0:
                ax.text((a - origin) / 1e3, y + 0.47, f"step {step}", fontsize=7, va="bottom", color="0.4")
        for kind, stage, mb, a, b in r["blocks"]:
            x, w = (a - origin) / 1e3, (b - a) / 1e3
            ax.broken_barh([(x, w)], (y - 0.35, 0.7), facecolor=KINDS[kind][1], edgecolor="white", lw=0.5,
                           alpha=1.0 if stage % 2 == 0 or result["vpp"] == 1 else 0.7, zorder=2)
            if w > width_ms / 70 and kind != "L":
                label = f"{mb}" if result["vpp"] == 1 else f"s{stage}:{mb}"
                ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=7, color="white", zorder=3)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"rank {r['rank']} (pp {r['pp_rank']}, dp {r['dp_rank']}, tp {r['tp_rank']})"
                        for r in reversed(ranks)], fontsize=8)
    ax.set_xlabel("time (ms)" + (" on the device" if result["device_time"] else " on the host"))
    ax.set_xlim(0, width_ms * 1.01)
    ax.set_ylim(-0.6, n - 0.25)
    used = {b[0] for r in ranks for b in r["blocks"]}
    handles = [Patch(color=c, label=name) for k, (name, c) in KINDS.items() if k in used]
    handles.append(Patch(color="0.93", label="rest of the step (idle, optimizer, ...)"))
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25 if n < 3 else -0.12),
              ncol=len(handles), frameon=False)
    meas = result["measured"]
    steps = ", ".join(str(s["step"]) for s in result["per_step"])
    steps = ("steps " if len(result["per_step"]) > 1 else "step ") + steps
    ax.set_title(f"pipeline timeline, {result['schedule']} pp={result['pp']} vpp={result['vpp']} "
                 f"m={result['microbatches']} ({steps}): bubble fraction measured "
                 f"{'-' if meas is None else f'{meas:.3f}'} vs theoretical {result['theoretical']:.3f}; "
                 f"blocks are labelled with their microbatch", fontsize=10)
    fig.savefig(png)
