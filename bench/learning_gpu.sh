#!/usr/bin/env bash
# The learning bench at GPU scale: a ~100M-parameter Qwen2-VL controller trained from scratch
# in bf16 (precision "auto" picks bf16 on a GPU that supports it), ~20 minutes of SFT, then
# exploration with the SFT policy, DPO, and a learning curve over training-set sizes.
#
#   bash bench/learning_gpu.sh [OUT]          # on a machine with a CUDA GPU
#
# Target: the 100M controller answers at least 30% of the 100 held-out programs end to end.
# Writes OUT/learning.json (every stage's time and metrics) and prints the table; copy the
# table into bench/RESULTS.md with the GPU's name and the date.
set -euo pipefail
OUT=${1:-/tmp/tracetune-learning-gpu}
PY=${PYTHON:-python}
"$PY" - <<'PYCHECK'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/learning_gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print("GPU:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PYCHECK
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# --threads 0: leave CPU threading to torch (the CPU-side tools, OCR, use the cores).
"$PY" bench/learning.py --out "$OUT" \
  --train 1000 --heldout 100 --size 100m \
  --sft-time 20m --epochs 40 --batch-size 32 --lr 3e-4 --threads 0 \
  --max-tokens 96 --max-steps 6 \
  --explore-tasks 200 --explore-time 15m --k 4 --dpo-time 10m --dpo-lr 1e-5 \
  --curve 100,300,1000 --curve-time 10m
