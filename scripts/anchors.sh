#!/usr/bin/env bash
# Make .venv-anchors: the tools benchmarks compare graphpress with, kept out of graphpress's own
# environment (llm-compressor pins transformers <= 5.17). Benchmarks that find it missing say so
# and skip that anchor. torch==2.13.0 first, so the CPU wheel is the one that stays.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-anchors/bin/python ]; then
  "$PYTHON" -m venv .venv-anchors
fi
.venv-anchors/bin/python -m pip install -q "torch==2.13.0"
.venv-anchors/bin/python -m pip install -q "llmcompressor==0.14.0.1"
# onnxruntime-genai: its model builder (python -m onnxruntime_genai.models.builder) and its runtime,
# the deployment anchor of benchmarks/deploy.py.
.venv-anchors/bin/python -m pip install -q "onnxruntime-genai==0.18.*" onnx onnx_ir
