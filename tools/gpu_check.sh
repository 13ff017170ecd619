#!/usr/bin/env bash
# On a GPU machine: install onnxbn with onnxruntime-gpu and a CUDA torch, then compare
# a fine-tune step and the statistics on CUDA against the CPU. Under 5 minutes once
# the wheels are on disk. Exit 0 pass, 1 mismatch, 77 no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
make env ORT=gpu TORCH="${TORCH:-torch==2.13.0}" VENV="${VENV:-.venv-gpu}"
exec "${VENV:-.venv-gpu}/bin/python" tools/gpu_check.py
