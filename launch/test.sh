#!/usr/bin/env bash
# The test command: set up on a fresh machine, then run the whole suite (CPU only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the 25 slowest tests are listed at the end; each has a time limit (pyproject.toml). With no path argument
# pytest runs testpaths (tests/); with one (bash launch/test.sh tests/test_config.py -k override) only that part
"${PYTHON:-python3}" -m ruff check --quiet .  # lint first: pyproject.toml's rules, a second or two
exec "${PYTHON:-python3}" -m pytest -q --durations=25 "$@"
