#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py (it opens the report page and checks every figure loaded).
# Debian's package; needs root and apt. Idempotent; without root or apt it says so and exits 0 (the test is
# then skipped with that reason).
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: not root or no apt-get; skipping chromium (the browser test will be skipped)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
  || { timeout 300 apt-get update >/dev/null 2>&1 && timeout 600 apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; } \
  || echo "setup_browser: apt-get install chromium failed (the browser test will be skipped)" >&2
exit 0
