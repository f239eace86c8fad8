#!/usr/bin/env bash
# Runs the comparison benches one after another and writes bench/results.md (the table the README's
# "Performance" section shows): per bench and setting the ratio of medians (> 1: the first variant is faster),
# the min-max of the per-repeat ratios, the goal, the date, the machine and the torch version.
#
#   bench/run_all.sh [--quick] [--out FILE]
#
# Default settings take about 12 minutes on 2 cores (estimated from the --quick smoke runs; the budget is 20).
# --quick: 1 repeat and the fewest steps, only to check that every bench runs end to end (its figures mean
# nothing). Run it alone on the machine: it times. BENCH_LOCK=/path/to/lockfile runs each bench under
# `flock` on that file (a machine shared with other jobs). Each bench's full output is kept in the log folder
# printed at the start; its last line is the JSON record this script collects.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
OUT=bench/results.md
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --quick, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/vlp-bench-XXXXXX")
RESULTS="$LOGS/results.jsonl"
: > "$RESULTS"
echo "logs: $LOGS"
T_ALL=$(date +%s)
FAILED=0

run_bench() {  # name, then the bench's arguments
  local name=$1; shift
  local t0 rc last
  t0=$(date +%s)
  echo "== $name: $*"
  if [ -n "${BENCH_LOCK:-}" ]; then
    flock "$BENCH_LOCK" "$PY" "bench/$name.py" "$@" > "$LOGS/$name.log" 2>&1; rc=$?
  else
    "$PY" "bench/$name.py" "$@" > "$LOGS/$name.log" 2>&1; rc=$?
  fi
  last=$(tail -n 1 "$LOGS/$name.log")
  if [ $rc -ne 0 ] || [ "${last:0:1}" != "{" ]; then
    echo "   FAILED (exit $rc), see $LOGS/$name.log:"; tail -n 5 "$LOGS/$name.log" | sed 's/^/   /'
    FAILED=$((FAILED + 1))
    printf '%s\t{"error": "exit %s"}\n' "$name" "$rc" >> "$RESULTS"
  else
    printf '%s\t%s\n' "$name" "$last" >> "$RESULTS"
  fi
  echo "   $(( $(date +%s) - t0 )) s"
  printf '%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" >> "$LOGS/seconds.tsv"
}

if [ $QUICK -eq 1 ]; then
  run_bench modality_grouping --dp 1 2 --repeats 1 --warmup 0 --warmup-steps 0 --steps 10
  run_bench decoder_vs_hf --repeats 1 --warmup 1 --iters 2 --threads 2
  run_bench data_throughput --samples 16 --per-shard 8 --workers 1 2 --repeats 1 --warmup 1
  run_bench pipeline_balance --pp 2 --repeats 1
  run_bench vision_split --repeats 1 --stages 2
  run_bench step_balance --steps 3 --repeats 1 --warmup 0
else
  # estimates on 2 idle cores, from the --quick runs: ~5 min, ~0.5, ~1, ~1, ~1, ~3 (total ~12 min)
  run_bench modality_grouping --dp 1 2 --repeats 5 --warmup 0 --warmup-steps 10 --steps 20
  run_bench decoder_vs_hf --repeats 5 --warmup 1 --iters 10 --threads 2
  run_bench data_throughput --samples 128 --per-shard 16 --workers 1 2 --repeats 3 --warmup 1
  run_bench pipeline_balance --pp 2 --repeats 5
  run_bench vision_split --repeats 5 --stages 2 3
  run_bench step_balance --steps 12 --repeats 5 --warmup 1
fi

TOTAL=$(( $(date +%s) - T_ALL ))
MODEL=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
MACHINE="$(uname -m), $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs, ${MODEL:-unknown CPU}"
TORCH=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo unknown)
MODE=$([ $QUICK -eq 1 ] && echo "quick (smoke test: 1 repeat, fewest steps; figures not meaningful)" || echo default)

"$PY" - "$RESULTS" "$OUT" "$MACHINE" "$TORCH" "$MODE" "$TOTAL" "$LOGS/seconds.tsv" <<'EOF'
import datetime
import json
import sys

results, out, machine, torch_version, mode, total, seconds_file = sys.argv[1:8]
seconds = dict(line.rstrip("\n").split("\t", 1) for line in open(seconds_file) if line.strip())
SETTING_KEYS = ("dp", "pp", "tp", "workers", "threads")
NOTES = {"vision_split": "replicate / images step time"}  # benches with their own ratio keys


def fmt(x):
    return f"{x:.3f}" if isinstance(x, (int, float)) else "—"


def rows_of(bench, rec):
    """(bench, setting, ratio, spread, repeats, goal, met) rows of one bench's last JSON line."""
    if "error" in rec:
        return [(bench, "FAILED: " + rec["error"], "—", "—", "—", "—", "—")]
    rows = []
    for r in rec.get("settings", [rec]):
        if "ratio" in r:  # bench/_ab.py's record
            setting = ", ".join(f"{k}={r[k]}" for k in SETTING_KEYS if k in r)
            setting = f"{setting}; {r['a']} / {r['b']} {r['metric']}".lstrip("; ")
            goal = f">= {r['goal']}" if "goal" in r else "—"
            met = ("yes" if r["goal_met"] else "no") if "goal_met" in r else "—"
            rows.append((bench, setting, fmt(r["ratio"]), f"{fmt(r['ratio_min'])}-{fmt(r['ratio_max'])}",
                         str(r.get("repeats", "—")), goal, met))
    if not rows:  # an older bench: every "*_ratio" figure (one level of nesting), no spread
        flat = {}
        for k, v in rec.items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        for k, v in flat.items():
            if k.endswith("_ratio") and isinstance(v, (int, float)):
                note = f" ({NOTES[bench]})" if bench in NOTES else ""
                rows.append((bench, k + note, fmt(v), "—", str(rec.get("repeats", "—")), "—", "—"))
    return rows


records = [line.rstrip("\n").split("\t", 1) for line in open(results) if line.strip()]
lines = [
    "# Benchmark results",
    "",
    f"Written by `bench/run_all.sh` on {datetime.date.today().isoformat()}; machine: {machine}; "
    f"torch {torch_version}; mode: {mode}; total {int(total) // 60} min {int(total) % 60} s.",
    "",
    "ratio: median of the first variant's throughput over the second's (> 1: the first is faster); spread: "
    "min-max of the per-repeat ratios (the variants ran interleaved, A B A B, after a warm-up).",
    "",
    "| bench | setting | ratio (median) | spread | repeats | goal | met | bench time |",
    "|---|---|---|---|---|---|---|---|",
]
for name, line in records:
    try:
        rec = json.loads(line)
    except ValueError:
        rec = {"error": "last line is not JSON"}
    for row in rows_of(name, rec):
        lines.append("| " + " | ".join(row) + f" | {seconds.get(name, '?')} s |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "wrote $OUT; total $TOTAL s; logs in $LOGS"
[ $FAILED -eq 0 ]
