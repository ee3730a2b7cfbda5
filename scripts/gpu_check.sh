#!/usr/bin/env bash
# What only a GPU can show, in calls that each fit a 10-minute limit. Run from the repo root on
# a CUDA machine (torch + triton installed; nothing is fetched). Logs and results go to
# ${OUT:-gpu-out}/.
#   bash scripts/gpu_check.sh tests          # the whole suite, Triton kernels compiled (~8 min cap)
#   bash scripts/gpu_check.sh cuda           # build the CUDA extension, run its parity tests
#   bash scripts/gpu_check.sh bench OPS      # python -m bench --ops OPS (e.g. logprobs,linear_logprobs)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=${PYTHON:-python3}
nvidia-smi -L | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
case "${1:-}" in
  tests)
    timeout 480 "$PY" -m pytest -q -n 8 -p no:cacheprovider tests --junitxml="$OUT/tests.xml" \
        2>&1 | tee "$OUT/tests.log" ;;
  cuda)
    export MAX_JOBS=16 FASTRLHF_CACHE_DIR=/tmp/fastrlhf-cache
    timeout 240 "$PY" -c "from fastrlhf import _cuda; ok, why = _cuda.status(); print('cuda backend:', ok, why); print(_cuda.build_info() if ok else '')" \
        2>&1 | tee "$OUT/cuda-build.log"
    cp /tmp/fastrlhf-cache/cuda/*/build-error.log "$OUT/" 2>/dev/null
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_parity.py tests/test_logprobs.py \
        tests/test_advantages.py tests/test_kl.py tests/test_ppo.py -k cuda 2>&1 | tee "$OUT/cuda-tests.log" ;;
  bench)
    timeout 540 "$PY" -m bench --ops "${2:?which ops}" --max-minutes 7 --out "$OUT/{gpu}" 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "usage: bash scripts/gpu_check.sh tests | cuda | bench OPS" >&2; exit 2 ;;
esac
