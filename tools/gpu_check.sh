#!/usr/bin/env bash
# On a GPU machine: install onnxbn with onnxruntime-gpu and a CUDA torch, then compare
# a fine-tune step and the statistics on CUDA against the CPU. Under 5 minutes once
# the wheels are on disk. Exit 0 pass, 1 mismatch, 77 no GPU.
# PYTHON=python3 tools/gpu_check.sh uses that Python as it is (a machine with no package index,
# which already has torch, onnx and onnxruntime): the checks of onnxruntime on CUDA are then
# skipped where its CUDA provider is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" tools/gpu_check.py
fi
make env ORT=gpu TORCH="${TORCH:-torch==2.13.0}" VENV="${VENV:-.venv-gpu}"
exec "${VENV:-.venv-gpu}/bin/python" tools/gpu_check.py
