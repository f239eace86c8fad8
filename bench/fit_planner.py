"""Fit the planner's efficiency table (``vlpretrain/planning/fitted_efficiency.json``) to published runs.

    python bench/fit_planner.py --csv ../shared/published_runs/calibration.csv [--out FILE]

Deterministic: the evaluable rows (``planning.published.load_runs``) in file order; every third one (positions
1, 4, 7, ... counting from 0) is held out and the rest are fitted. For each fitted row the efficiency that
reproduces its measured tokens/s is solved for (``implied_efficiency``, communication and bubbles modelled);
the table holds, per GPU family and matmul width (hidden / tp, rounded to a power of two), the median of those
(cells with at least ``MIN_ROWS`` rows). The attention ratio (flash attention's efficiency relative to the
matmuls') is the value of ``RATIOS`` whose table fits the fitted rows best (median |relative error|). The
output names the CSV (and its sha256) and every row it was fitted on and held out from.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.files import write_text_atomic  # noqa: E402
from vlpretrain.planning.efficiency import TABLE_PATH, efficiency_fn  # noqa: E402
from vlpretrain.planning.published import implied_efficiency, load_runs, predict_run, read_csv  # noqa: E402

RATIOS = (0.35, 0.45, 0.55, 0.7, 0.85, 1.0)
MIN_ROWS = 2
UNEXPLAINED = 1.0  # an implied efficiency at or above this: the model's communication alone exceeds the measured
#                    step (or the row is inconsistent); such rows are listed and left out of the medians


def split_rows(runs: list) -> tuple[list, list]:
    fit = [r for i, r in enumerate(runs) if i % 3 != 1]
    held = [r for i, r in enumerate(runs) if i % 3 == 1]
    return fit, held


def build_table(runs: list, ratio: float) -> dict:
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    implied, unexplained = [], []
    for run in runs:
        e = implied_efficiency(run, ratio)
        if e >= UNEXPLAINED:
            unexplained.append(run.line)
            continue
        implied.append(e)
        cells[(run.cluster.family, 2 ** round(math.log2(run.width)))].append(e)
    families: dict[str, dict] = {}
    for (fam, width) in sorted(cells):
        vals = cells[(fam, width)]
        if len(vals) < MIN_ROWS:
            continue
        row = families.setdefault(fam, {"widths": [], "efficiency": [], "rows": []})
        row["widths"].append(width)
        row["efficiency"].append(round(statistics.median(vals), 4))
        row["rows"].append(len(vals))
    return {"default": round(statistics.median(implied), 4), "attention_ratio": ratio, "families": families,
            "unexplained_fit_lines": unexplained}


def median_abs_rel_err(runs: list, table: dict) -> float:
    errs = []
    for run in runs:
        pred = predict_run(run, efficiency_fn(run.cluster.family, table), table["attention_ratio"])
        errs.append(abs(pred["tokens_per_s_per_gpu"] / run.measured_tokens_per_s - 1))
    return statistics.median(errs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", default=str(TABLE_PATH))
    args = ap.parse_args(argv)
    runs, _ = load_runs(read_csv(args.csv))
    fit, held = split_rows(runs)
    best = None
    for ratio in RATIOS:
        table = build_table(fit, ratio)
        err = median_abs_rel_err(fit, table)
        print(f"attention_ratio {ratio:.2f}: fitted rows' median |rel err| {err:.3f}")
        if best is None or err < best[0]:
            best = (err, table)
    table = best[1]
    digest = hashlib.sha256(Path(args.csv).read_bytes()).hexdigest()
    table.update({
        "fitted_by": "bench/fit_planner.py", "csv": Path(args.csv).name, "csv_sha256": digest,
        "fit_median_abs_rel_err": round(best[0], 4),
        "fit_rows": [{"line": r.line, "key": r.key} for r in fit],
        "held_out_rows": [{"line": r.line, "key": r.key} for r in held]})
    import json

    write_text_atomic(Path(args.out), json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}: {len(fit)} rows fitted, {len(held)} held out, attention_ratio "
          f"{table['attention_ratio']}, families {', '.join(table['families'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
