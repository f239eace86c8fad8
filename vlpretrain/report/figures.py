"""The report's figures: one PNG per topic, every run overlaid in its own colour (matplotlib, no display).

Each ``fig_*`` takes the runs and returns a matplotlib Figure, or None when no run has the data. Figures are
built with ``matplotlib.figure.Figure`` directly (the Agg canvas), so the global backend is never touched.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from vlpretrain.report.data import Run, reduce

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]
STYLES = ["-", "--", ":", "-."]


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _figure(ncols: int, title: str, height: float = 3.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.2 * ncols, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0].tolist()
    fig.suptitle(title, fontsize=12)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    return fig, axes


def _curve(ax, x: np.ndarray, y: np.ndarray, color: str, label: str | None, style: str = "-",
           band: bool = True, lw: float = 1.4) -> bool:
    """Plot y(x) reduced to buckets; the min-max band shows what bucketing hid. False if nothing to plot."""
    xm, mean, lo, hi = reduce(x, y)
    if len(xm) == 0:
        return False
    if len(xm) == 1:
        ax.plot(xm, mean, "o", color=color, label=label)
        return True
    ax.plot(xm, mean, style, color=color, lw=lw, label=label, marker="." if len(xm) <= 60 else None, ms=5)
    if band and np.any(hi > lo):
        ax.fill_between(xm, lo, hi, color=color, alpha=0.15, lw=0)
    return True


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def fig_loss(runs: list[Run]) -> Figure | None:
    if not any(len(r.steps) for r in runs):
        return None
    fig, (ax_t, ax_m) = _figure(2, "training loss by step modality")
    for ax, want, title in ((ax_t, True, "language-only steps"), (ax_m, False, "multimodal steps")):
        any_ = False
        for i, r in enumerate(runs):
            sel = r.is_text == want
            any_ |= _curve(ax, r.steps[sel], r.cols["loss"][sel], _color(i), r.name)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("loss (nats / token)")
        if any_:
            _legend(ax)
        else:
            _empty(ax, "no such steps")
    return fig


def fig_lr(runs: list[Run]) -> Figure | None:
    if not any(len(r.steps) for r in runs):
        return None
    fig, (ax_lr, ax_g) = _figure(2, "learning rate and gradient norm")
    for i, r in enumerate(runs):
        _curve(ax_lr, r.steps, r.cols["lr"], _color(i), r.name, band=False)
        _curve(ax_g, r.steps, r.cols["grad_norm"], _color(i), r.name)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_g.set_ylabel("gradient norm (before clipping)")
    _legend(ax_lr)
    _legend(ax_g)
    return fig


def fig_language_share(runs: list[Run]) -> Figure | None:
    """Only runs whose config schedules a language share (grouped modalities: the target is logged) are drawn."""
    scheduled = [(i, r) for i, r in enumerate(runs) if np.isfinite(r.cols["language_ratio_target"]).any()]
    if not scheduled:
        return None
    fig, (ax,) = _figure(1, "language-only share of steps so far: realised vs the schedule's target")
    fig.set_size_inches(9, 3.8)
    for i, r in scheduled:
        target = np.nan_to_num(r.cols["language_ratio_target"])
        # the planner keeps the language steps so far within one of the summed target: compare the realised
        # share with the target's running mean (the schedule's value at each step is the thin dashed line)
        mean_target = np.cumsum(target) / np.arange(1, len(target) + 1)
        _curve(ax, r.steps, r.cols["language_ratio_realized"], _color(i), f"{r.name} realised", band=False)
        _curve(ax, r.steps, mean_target, _color(i), f"{r.name} target (mean so far)", ":", band=False, lw=2)
        _curve(ax, r.steps, r.cols["language_ratio_target"], _color(i), f"{r.name} target at the step", "--",
               band=False, lw=0.8)
    ax.set_ylabel("language-only steps / all steps")
    ax.set_ylim(-0.03, 1.03)
    _legend(ax)
    return fig


def fig_throughput(runs: list[Run]) -> Figure | None:
    if not any(len(r.steps) for r in runs):
        return None
    fig, (ax_t, ax_m) = _figure(2, "throughput")
    for i, r in enumerate(runs):
        _curve(ax_t, r.steps, r.cols["tokens_per_s"], _color(i), r.name)
        _curve(ax_m, r.steps, 100 * r.cols["mfu"], _color(i), r.name)
    ax_t.set_ylabel("tokens / s (global batch)")
    ax_m.set_ylabel("MFU (%)")
    _legend(ax_t)
    _legend(ax_m)
    return fig


def _eval_series(r: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(e["step"], float(e[key])) for e in r.evals if isinstance(e.get(key), (int, float))]
    if not pts and key == "mcppl_accuracy":  # no eval.jsonl: the final evaluation of summary.json
        ev = r.summary.get("eval")
        if isinstance(ev, dict) and isinstance(ev.get("accuracy"), (int, float)):
            pts = [(int(r.summary.get("steps", r.steps[-1] if len(r.steps) else 0)), float(ev["accuracy"]))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x, dtype=np.float64), np.asarray(y)


def fig_eval(runs: list[Run]) -> Figure | None:
    acc = [_eval_series(r, "mcppl_accuracy") for r in runs]
    bpb = [_eval_series(r, "text_bpb") for r in runs]
    has_acc, has_bpb = any(len(x) for x, _ in acc), any(len(x) for x, _ in bpb)
    if not (has_acc or has_bpb):
        return None
    fig, axes = _figure(int(has_acc) + int(has_bpb), "evaluation during training")
    ax_a = axes[0] if has_acc else None
    ax_b = axes[-1] if has_bpb else None
    for i, r in enumerate(runs):
        if ax_a is not None and len(acc[i][0]):
            ax_a.plot(*acc[i], "o-", color=_color(i), label=r.name, ms=4)
            if len(runs) == 1:  # one run: its question types too
                types = sorted({t for e in r.evals for t in (e.get("mcppl_by_type") or {})})
                for j, t in enumerate(types):
                    pts = [(e["step"], e["mcppl_by_type"][t]) for e in r.evals
                           if isinstance((e.get("mcppl_by_type") or {}).get(t), (int, float))]
                    ax_a.plot(*zip(*pts), STYLES[1 + j % 3], color=_color(j + 1), lw=1, alpha=0.8, label=t)
        if ax_b is not None and len(bpb[i][0]):
            ax_b.plot(*bpb[i], "o-", color=_color(i), label=r.name, ms=4)
    if ax_a is not None:
        ax_a.set_title("multi-choice perplexity (MCPPL)", fontsize=10)
        ax_a.set_ylabel("accuracy")
        _legend(ax_a)
    if ax_b is not None:
        ax_b.set_title("held-out language text", fontsize=10)
        ax_b.set_ylabel("bits per byte")
        _legend(ax_b)
    return fig


def fig_sources(runs: list[Run]) -> Figure | None:
    names = list(dict.fromkeys(n for r in runs for n in r.sources))
    if not names:
        return None
    fig, (ax,) = _figure(1, "samples drawn per source (cumulative)", height=4.2)
    fig.set_size_inches(9, 4.2)
    for i, r in enumerate(runs):
        for j, n in enumerate(names):
            if n in r.sources:
                label = n if len(runs) == 1 else f"{r.name}: {n}"
                _curve(ax, r.steps, np.cumsum(r.sources[n]), _color(j), label, STYLES[i % len(STYLES)],
                       band=False)
    ax.set_ylabel("samples")
    if len(names) * len(runs) <= 24:
        ax.legend(fontsize=7, loc="upper left", ncol=1 + len(names) * len(runs) // 9)
    return fig


def fig_bad_data(runs: list[Run]) -> Figure | None:
    if not any(len(r.steps) for r in runs):
        return None
    fig, axes = _figure(3, "bad data (cumulative)", height=3.2)
    for i, r in enumerate(runs):
        bad = sum(r.bad_samples.values()) if r.bad_samples else np.zeros(len(r.steps))
        _curve(axes[0], r.steps, np.cumsum(bad), _color(i), r.name, band=False)
        _curve(axes[1], r.steps, np.nancumsum(r.cols["bad_images"]), _color(i), r.name, band=False)
        _curve(axes[2], r.steps, r.cols["skipped_samples"], _color(i), r.name, band=False)
    for ax, t in zip(axes, ("bad samples skipped (logged per step)", "undecodable images (rank 0)",
                            "skipped_samples (run total)")):
        ax.set_title(t, fontsize=10)
        ax.set_ylabel("count")
        _legend(ax)
    return fig


def fig_balance(runs: list[Run]) -> Figure | None:
    """Runs that log the placement's prediction (data.balance, data/placement.py) only."""
    logged = [(i, r) for i, r in enumerate(runs) if np.isfinite(r.cols["rank_cost_imbalance"]).any()]
    if not logged:
        return None
    fig, (ax_t, ax_m) = _figure(2, "predicted step / mean dp-rank cost per step")
    for ax, want, title in ((ax_t, True, "language-only steps"), (ax_m, False, "multimodal steps")):
        any_ = False
        for i, r in logged:
            sel = r.is_text == want
            any_ |= _curve(ax, r.steps[sel], r.cols["rank_cost_imbalance"][sel], _color(i), f"{r.name} as placed")
            _curve(ax, r.steps[sel], r.cols["rank_cost_imbalance_contiguous"][sel], _color(i),
                   f"{r.name} contiguous shares", "--", band=False, lw=1.0)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("step / mean rank (1 = balanced)")
        if any_:
            _legend(ax)
        else:
            _empty(ax, "no such steps")
    return fig


FIGURES = [  # file stem, builder, caption
    ("loss", fig_loss, "Training loss per step, split into language-only and multimodal steps (the bands are "
                       "the min-max of the steps each plotted point stands for)."),
    ("lr", fig_lr, "Learning-rate schedule and gradient norm."),
    ("language_share", fig_language_share, "Share of language-only steps so far as the planner realised it "
                                           "(solid), the running mean of the schedule's target (dotted; the "
                                           "planner keeps the two within one step) and the target at each step "
                                           "(data.language_ratio, dashed)."),
    ("throughput", fig_throughput, "Tokens per second over the global batch and model FLOPs utilisation."),
    ("eval", fig_eval, "Evaluations during training (eval.jsonl; without it, the final evaluation of "
                       "summary.json)."),
    ("sources", fig_sources, "Samples drawn from each data source, cumulative."),
    ("bad_data", fig_bad_data, "Unusable samples skipped and images replaced by blanks."),
    ("balance", fig_balance, "Predicted step imbalance across data-parallel ranks: the predicted step (the "
                             "slowest rank, or the slowest per microbatch when ranks run in lockstep) over the "
                             "mean rank's cost (the cost model of data/placement.py), for the rows as placed (solid; "
                             "data.balance) and as contiguous shares in plan order (dashed). 1.10 means the "
                             "other ranks wait 10% of a step for the slowest."),
]
