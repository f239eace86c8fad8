#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (the CPU machines take these wheels from local disk), then this
# package with its test extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# installed? found without importing them (importing torch, transformers and matplotlib takes 10-15 s)
installed() { $PY -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' "$@"; }
if ! installed torch torchvision timm; then
  $PY -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
if ! installed vlpretrain transformers pytest pytest_timeout ruff webdataset matplotlib pyarrow || [ "${VLP_REINSTALL:-0}" = 1 ]; then
  $PY -m pip install --quiet -e ".[test]"
fi
