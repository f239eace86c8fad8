#!/usr/bin/env bash
# One-GPU check at real size (DeepSeek-VL 1.3B, stage 2, bf16): engine vs a plain PyTorch loop, same run.
# Needs torch + timm on the machine (no network): pip install --no-deps -e . first.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
PYTHONPATH=. python3 bench/gpu_check.py "$@"
