#!/usr/bin/env bash
# The main job on a fresh CPU machine: set up, make the demo data, evaluate the untrained model, train the tiny
# DeepSeek-VL through stage 1 -> 2 -> 3, evaluate again. The last line is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1
DATA=${DEMO_DATA:-demo_data}
RUNS=${DEMO_RUNS:-runs}
t0=$(date +%s)

python3 -m data_tools demo --out "$DATA" --seed 0
mkdir -p "$RUNS"
# DEMO_SET: extra overrides for every stage, e.g. DEMO_SET="model.attention=varlen" (only stage 2 packs rows)
read -r -a extra <<< "${DEMO_SET:-}"
common=(data.root="$DATA" "${extra[@]}")
# The evaluation before training is stage 1's first (train.eval_at_start: the random-init weights it starts from).
# --overwrite: each run of the demo trains the three stages afresh; a second run moves the first one's run dirs
# aside to $RUNS/tiny-stageN.old-<time> (about 30 MB each; delete them at will). Without it, train refuses a
# run dir that already holds a run.
python3 -m vlpretrain train --config configs/tiny/stage1.yaml --overwrite --set "${common[@]}" \
  train.run_dir="$RUNS/tiny-stage1"
python3 -m vlpretrain train --config configs/tiny/stage2.yaml --overwrite --set "${common[@]}" \
  train.run_dir="$RUNS/tiny-stage2" train.init_from="$RUNS/tiny-stage1"
python3 -m vlpretrain train --config configs/tiny/stage3.yaml --overwrite --set "${common[@]}" \
  train.run_dir="$RUNS/tiny-stage3" train.init_from="$RUNS/tiny-stage2"

# the run report: loss, LR, language share, throughput, evaluations, sources, bad data of the three stages
python3 -m vlpretrain report "$RUNS/tiny-stage1" "$RUNS/tiny-stage2" "$RUNS/tiny-stage3" --out "$RUNS/report" \
  > "$RUNS/report.json"
echo "report: $RUNS/report/index.html" >&2

# eval after: stage 3's final evaluation (the same eval file and numbers as `vlpretrain eval --weights
# $RUNS/tiny-stage3`, without a second process loading the model)
python3 - "$RUNS/tiny-stage1/eval.jsonl" "$RUNS/tiny-stage3/summary.json" "$t0" <<'PY'
import json, sys, time
first = json.loads(open(sys.argv[1]).readline())  # step 0 of stage 1
before = {"accuracy": first["mcppl_accuracy"], "by_type": first["mcppl_by_type"]}
final = json.loads(open(sys.argv[2]).read())["eval"]
after = {"accuracy": final["mcppl_accuracy"], "by_type": final["mcppl_by_type"]}
# per question type, before and after training (4 options per question: chance is 0.25)
print(f"{'MCPPL accuracy':<16}{'before':>8}{'after':>8}", file=sys.stderr)
for t in sorted(after["by_type"]):
    print(f"  {t:<14}{before['by_type'].get(t, float('nan')):>8.2f}{after['by_type'][t]:>8.2f}", file=sys.stderr)
print(f"  {'overall':<14}{before['accuracy']:>8.2f}{after['accuracy']:>8.2f}", file=sys.stderr)
print(f"demo wall time {time.time() - int(sys.argv[3]):.0f}s", file=sys.stderr)
print(json.dumps({"demo": "ok", "mcppl_accuracy_before": before["accuracy"],
                  "mcppl_accuracy_after": after["accuracy"], "by_type_before": before["by_type"],
                  "by_type_after": after["by_type"]}))
PY
