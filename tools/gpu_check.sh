#!/usr/bin/env bash
# One-shot GPU check for a CUDA machine with no network (see tools/gpu_check.py for what it measures).
#   tools/gpu_check.sh [--n 32768] [--device cuda] [--smoke]   (--smoke: the CPU, tiny sizes; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -c "import torch, torchvision, webdataset, simplejpeg, pyarrow, fsspec" 2>/dev/null || {
  echo "gpu_check: install featpipe first (pip install -e '.[faiss]')" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" tools/gpu_check.py "$@"
