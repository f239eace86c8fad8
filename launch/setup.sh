#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (the CPU machines take these wheels from local disk), then this
# package with its test extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, torchvision, timm" >/dev/null 2>&1; then
  $PY -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
if ! $PY -c "import vlpretrain, transformers, pytest, pytest_timeout, ruff, webdataset, matplotlib, pyarrow" >/dev/null 2>&1 || [ "${VLP_REINSTALL:-0}" = 1 ]; then
  $PY -m pip install --quiet -e ".[test]"
fi
