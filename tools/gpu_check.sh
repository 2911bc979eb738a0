#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py): about 8 minutes on one GPU, nothing downloaded. It needs the
# project's requirements and one CUDA GPU; it writes OUT/gpu_check.json and OUT/gpu_check.md.
#   bash tools/gpu_check.sh [OUT]          # OUT: the argument, else $OUT, else gpu_check/
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 tools/gpu_check.py "$out" "${@:2}"
