"""The planner's cost model against published GPU runs: predicted and published tokens/s per GPU (and memory
where published), side by side, for every row it can evaluate; one JSON line last.

    python bench/plan_validation.py --csv ../shared/published_runs/calibration.csv [--json] [--table FILE]

The CSV has the columns of ``published_runs/README.md``. Rows the efficiency table was fitted on
(``fit_rows`` in ``vlpretrain/planning/fitted_efficiency.json``, matched by content, not line) are marked
``fit``; every other row is held out, and the headline figures are over the held-out rows (``--all`` counts
every evaluated row instead). Skipped rows are listed with their reason (context parallelism, fp8, ...).

JSON keys: rows_evaluated, rows_skipped, rows_held_out, rows_fit, tokens_per_s_median_abs_rel_err,
tokens_per_s_within_25pct (fraction, held out), the same two over the fitted rows (``fit_...``), memory_rows
(rows with a published memory, held out) and memory_within_20pct (None when there are none), skip_reasons.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.errors import UserError  # noqa: E402
from vlpretrain.planning.efficiency import TABLE_PATH, efficiency_fn, load_table  # noqa: E402
from vlpretrain.planning.published import load_runs, predict_run, read_csv  # noqa: E402


def _stats(errs: list[float], within: float) -> tuple[float | None, float | None]:
    if not errs:
        return None, None
    return round(statistics.median(errs), 4), round(sum(e <= within for e in errs) / len(errs), 4)


def evaluate(csv_path: str, table_path: str = str(TABLE_PATH), quiet: bool = False, use_all: bool = False) -> dict:
    table = load_table(table_path)
    fitted = {r["key"] for r in table.get("fit_rows", [])}
    runs, skipped = load_runs(read_csv(csv_path))
    tok_err = {"fit": [], "held": []}
    mem_err = []
    lines = [f"{'line':>5} {'set':>4}  {'model':<18}{'gpu':<10}{'gpus':>5} {'tp':>3}{'pp':>3}{'vpp':>4}{'dp':>5}"
             f"{'mb':>4}{'seq':>7}  {'tok/s pub':>10}{'pred':>9}{'err':>8}  {'mem pub':>8}{'pred':>7}"]
    for run in runs:
        pred = predict_run(run, efficiency_fn(run.cluster.family, table), table.get("attention_ratio", 1.0))
        which = "fit" if run.key in fitted and not use_all else "held"
        err = pred["tokens_per_s_per_gpu"] / run.measured_tokens_per_s - 1
        tok_err[which].append(abs(err))
        mem = ""
        if run.measured_memory_gib:
            merr = pred["memory_gib"] / run.measured_memory_gib - 1
            if which == "held":
                mem_err.append(abs(merr))
            mem = f"{run.measured_memory_gib:>8.1f}{pred['memory_gib']:>7.1f}"
        r, lay = run.row, run.lay
        lines.append(f"{run.line:>5} {which:>4}  {r['model'][:17]:<18}{run.cluster.gpu:<10}{r['gpus']:>5} "
                     f"{lay.tp:>3}{lay.pp:>3}{lay.vpp:>4}{lay.dp:>5}{r['micro_batch'] or '-':>4}{r['seq_len']:>7}  "
                     f"{run.measured_tokens_per_s:>10.0f}{pred['tokens_per_s_per_gpu']:>9.0f}{err * 100:>+7.0f}%  "
                     f"{mem}")
    for line, model, why in skipped:
        lines.append(f"{line:>5} skip  {model[:17]:<18}{why}")
    held_med, held_25 = _stats(tok_err["held"], 0.25)
    fit_med, fit_25 = _stats(tok_err["fit"], 0.25)
    _, mem_20 = _stats(mem_err, 0.20)
    summary = {
        "rows_evaluated": len(runs), "rows_skipped": len(skipped), "rows_held_out": len(tok_err["held"]),
        "rows_fit": len(tok_err["fit"]), "tokens_per_s_median_abs_rel_err": held_med,
        "tokens_per_s_within_25pct": held_25, "fit_tokens_per_s_median_abs_rel_err": fit_med,
        "fit_tokens_per_s_within_25pct": fit_25, "memory_rows": len(mem_err), "memory_within_20pct": mem_20,
        "skip_reasons": dict(Counter(why.split(" (")[0].split(" ")[0] for _, _, why in skipped).most_common()),
        "table": Path(table_path).name}
    if not quiet:
        print("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True)
    ap.add_argument("--table", default=str(TABLE_PATH), help="the fitted efficiency table")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--all", action="store_true", help="count every evaluated row as held out")
    args = ap.parse_args(argv)
    try:
        summary = evaluate(args.csv, args.table, quiet=args.json, use_all=args.all)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
