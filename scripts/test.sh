#!/usr/bin/env bash
# Set up and run the whole test suite (slow tests included). pytest's exit status is
# passed through unchanged: 5 ("no tests collected") fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check graphpress examples tests benchmarks
exec .venv/bin/python -m pytest "$@"
