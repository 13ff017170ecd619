#!/usr/bin/env bash
# On a GPU machine with no package index (torch, onnx and onnxruntime already installed): the GPU
# check, then the tests whose code runs torch or onnxruntime on CUDA (device "auto" picks the GPU
# there), then the rest of the suite, each file's results written as they come, so a run cut at its
# time limit still says which tests failed and why. Usage:
#   PYTHON=python3 LOGS=$OUT tools/gpu_suite.sh        (LOGS: where gpu_check.json and the logs go)
# Exit 0 when everything that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOGS="${LOGS:-.}"
JOBS="${JOBS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
timeout "${CHECK_SECONDS:-150}" "$PYTHON" tools/gpu_check.py > "$LOGS/gpu_check.json" 2>&1 || status=1
FIRST=(tests/test_gpu.py tests/test_recalibrate.py tests/test_distributed.py tests/test_training.py
       tests/test_matrix_modern.py tests/test_matrix.py)
parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n "$JOBS")
run() {  # one pytest run: one line per test as it ends, failures with their first lines, then the summary
    timeout "$1" "$PYTHON" -m pytest -p no:cacheprovider "${parallel[@]}" -rfEs --tb=short -v "${@:3}" > "$LOGS/$2" 2>&1
}
run "${FIRST_SECONDS:-240}" gpu_first.log "${FIRST[@]}" || status=1
rest=()
for f in tests/test_*.py; do [[ " ${FIRST[*]} " == *" $f "* ]] || rest+=("$f"); done
run "${REST_SECONDS:-300}" gpu_rest.log "${rest[@]}" || status=1
grep -h -E "^(FAILED|ERROR) " "$LOGS"/gpu_first.log "$LOGS"/gpu_rest.log | cut -c1-300
tail -n 1 "$LOGS"/gpu_first.log "$LOGS"/gpu_rest.log
exit $status
