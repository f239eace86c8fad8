"""``vlpretrain report RUN_DIR [RUN_DIR ...] --out DIR``: one offline HTML page plus its PNG figures.

The page references its figures as relative files in the same directory (no network asset, no script), so
the directory can be copied or zipped as it is. Runs are overlaid, each in its own colour, named by their
directory.
"""
from __future__ import annotations

import html
import math
import shutil
import time
from pathlib import Path

import numpy as np

from vlpretrain.errors import UserError

PAGE = "index.html"


def write_report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Load the runs, draw every figure that has data, write ``out/index.html``. Returns what was written."""
    from vlpretrain.report.data import load_run, run_names
    from vlpretrain.report.figures import FIGURES

    t0 = time.perf_counter()
    if not run_dirs:
        raise UserError("report: give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, run_names(paths))]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"report: cannot create {out}: {e.strerror}") from None
    t_load = time.perf_counter() - t0
    figures = []
    for stem, build, caption in FIGURES:
        fig = build(runs)
        if fig is None:
            continue
        fig.savefig(out / f"{stem}.png")
        figures.append((f"{stem}.png", caption))
    timelines = []
    for i, r in enumerate(runs):
        if r.timeline is not None:
            name = f"timeline_{i}.png"
            shutil.copyfile(r.timeline, out / name)
            timelines.append((name, r))
    (out / PAGE).write_text(_page(runs, figures, timelines), encoding="utf-8")
    return {"report": str(out / PAGE), "figures": [f for f, _ in figures] + [t for t, _ in timelines],
            "runs": [r.name for r in runs], "steps": [int(len(r.steps)) for r in runs],
            "load_s": round(t_load, 3), "time_s": round(time.perf_counter() - t0, 3)}


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _median(a: np.ndarray, skip_first: bool = True):
    a = a[1:] if skip_first and len(a) > 1 else a  # the first step pays for warm-up
    a = a[np.isfinite(a)]
    return float(np.median(a)) if len(a) else None


def _imbalance(c: dict) -> str:
    """Mean predicted step / mean dp-rank cost, as placed and contiguous ("-" for runs that do not log it)."""
    placed, contiguous = c["rank_cost_imbalance"], c["rank_cost_imbalance_contiguous"]
    if not np.isfinite(placed).any():
        return "-"
    return f"{np.nanmean(placed):.3f} / {np.nanmean(contiguous):.3f}"


def _summary_rows(runs) -> str:
    rows = []
    for r in runs:
        c, tr = r.cols, r.config.get("train", {}) if isinstance(r.config.get("train"), dict) else {}
        par = r.config.get("parallel", {}) if isinstance(r.config.get("parallel"), dict) else {}
        last_eval = r.evals[-1] if r.evals else {}
        acc = last_eval.get("mcppl_accuracy")
        if acc is None and isinstance(r.summary.get("eval"), dict):
            acc = r.summary["eval"].get("accuracy")
        layout = "/".join(str(par.get(k, "?")) for k in ("dp", "tp", "pp")) if par else "-"
        cells = [r.name, tr.get("stage", "-"), f"{len(r.steps)}", layout,
                 _fmt(float(c["loss"][0]) if len(r.steps) else None),
                 _fmt(float(c["loss"][-1]) if len(r.steps) else None),
                 _fmt(_median(c["tokens_per_s"]), 5), _fmt(100 * (_median(c["mfu"]) or math.nan), 3),
                 _fmt(_median(c["step_time_s"]), 3), _imbalance(c), _fmt(acc), _fmt(last_eval.get("text_bpb")),
                 _fmt(r.summary.get("wall_time_s"))]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    head = ["run", "stage", "steps", "dp/tp/pp", "first loss", "last loss", "tokens/s (median)", "MFU % (median)",
            "step s (median)", "rank imbalance placed / contiguous (mean)", "MCPPL acc (last)",
            "bits/byte (last)", "wall s"]
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>\n" + "\n".join(rows)
            + "</table>")


def _page(runs, figures, timelines) -> str:
    parts = [f"<h2>Runs</h2>{_summary_rows(runs)}",
             "<p class=note>" + " &middot; ".join(
                 f"<b>{html.escape(r.name)}</b>: {html.escape(str(r.path))}" for r in runs) + "</p>"]
    if not any(r.evals for r in runs):
        parts.append("<p class=note>No run has an eval.jsonl: the evaluation figure, if any, shows the final "
                     "evaluation from summary.json.</p>")
    for name, caption in figures:
        parts.append(f'<figure><img src="{name}" alt="{html.escape(name)}"><figcaption>{html.escape(caption)}'
                     "</figcaption></figure>")
    for name, r in timelines:
        b = r.bubble or {}
        text = ""
        if b:
            sched = html.escape(str(b.get("schedule")))
            text = (f" Measured bubble fraction {_fmt(b.get('measured'), 3)} vs the {sched} schedule's theoretical "
                    f"{_fmt(b.get('theoretical'), 3)} (pp={b.get('pp')}, vpp={b.get('vpp')}, "
                    f"{b.get('microbatches')} microbatches).")
        parts.append(f'<figure><img src="{name}" alt="{html.escape(name)}"><figcaption>Pipeline timeline of '
                     f"{html.escape(r.name)} (train.profile.steps): one row per rank; gaps are idle time.{text}"
                     "</figcaption></figure>")
    title = "vlpretrain report: " + ", ".join(r.name for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption, .note {{ font-size: 0.85em; color: #555; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p class=note>Written {time.strftime("%Y-%m-%d %H:%M:%S")} by <code>vlpretrain report</code>.</p>
{chr(10).join(parts)}
</body></html>
"""
