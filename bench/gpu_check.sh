#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one H100/H200: one JSON line per check on stdout (see the docstring
# of bench/gpu_check.py: stage2 engine vs plain baseline, attention kinds, plan memory, transformer-engine).
# Installs nothing from the network: needs torch, timm and transformers on the machine already; installs this
# package with --no-deps only when it is not importable. Extra arguments go to gpu_check.py (e.g. --cpu-smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1

echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >&2 || true
"$PY" - >&2 <<'EOF' || true
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "timm", "transformers", "transformer_engine"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "not importable:", type(e).__name__)
EOF
if ! "$PY" -c "import vlpretrain" 2>/dev/null; then
    echo "# vlpretrain not importable: pip install --no-deps -e . (no index)" >&2
    "$PY" -m pip install --no-deps --no-index --no-build-isolation -e . >&2 || echo "# install failed: using PYTHONPATH" >&2
fi
# gpu_check.py keeps itself within --budget-s (450 s by default, each check under its own budget); the timeout
# is the last resort, and whatever it printed before stays printed
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 470 "$PY" bench/gpu_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo '{"check": "summary", "error": "killed at 470 s by gpu_check.sh"}'
exit $rc
