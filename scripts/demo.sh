#!/usr/bin/env bash
# The main job on the bundled example: compress examples/tiny_llama with its spec,
# write out/tiny_llama/{model.onnx,report.json,report.md,report.html,plots/}, summarise the ONNX
# file and score it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/graphpress compress --model examples/tiny_llama --spec examples/tiny_llama/spec.json --out out/tiny_llama
.venv/bin/graphpress inspect out/tiny_llama/model.onnx
.venv/bin/python -m examples.tiny_llama.evaluate out/tiny_llama/model.onnx
