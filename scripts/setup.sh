#!/usr/bin/env bash
# Create .venv and install graphpress with its test dependencies. Idempotent.
# torch==2.13.0 is installed first and on its own: it resolves to the CPU wheel on this
# machine, and a later bare "torch" requirement is then already satisfied (no CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The installed environment takes about 4 GB (triton 1.0, torch 0.75, tvm 0.3, torch-mlir 0.3); no wheel cache,
# which would hold a second copy of each download (a CI machine once ran out of disk installing).
export PIP_NO_CACHE_DIR=1
free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${free_kb:-0}" -lt $((5 * 1024 * 1024)) ]; then
  echo "setup.sh: only $((free_kb / 1024)) MB free on $(df -P . | awk 'NR == 2 {print $6}'); the install needs about 5 GB" >&2
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
