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
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
