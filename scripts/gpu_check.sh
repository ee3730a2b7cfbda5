#!/usr/bin/env bash
# What only a GPU can show, in ONE call of at most 8 minutes (run from the repo root on a CUDA
# machine with torch and triton; nothing is fetched). In priority order, each stage with its
# own time budget so a slow stage cannot starve the next:
#   (a) compiled correctness: the whole test suite (ops on the triton backend,
#       the pipeline on cuda, the integrations, the trainers' one-step parity)      180 s
#   (e) one training phase end to end (bench/e2e): Qwen2.5-1.5B shape, GRPO,
#       every variant that imports (times, peak memory, parity with naive), then
#       naive's and fastrlhf's frontier with gradient checkpointing               90 s
#   (b) the headline benchmarks side by side (torch, torch.compile, fastrlhf
#       triton and cuda, TRL / Liger / CCE where they import), with the same-run
#       copy bandwidth and bf16 GEMM rate                                          150 s
#   (c) the CUDA extension (built in the background during (a) and (e)) and its parity  60 s
# Results: at most 9 files in ${OUT:-gpu-out}/ (env.txt, tests.log, tests.xml, e2e.tgz, bench.log,
# bench.tgz, cuda.log, cuda.xml). Import them here with: python -m bench.gpu_import DIR
# (e2e.tgz, with its log inside, into bench/results/<gpu>/e2e/).
# Peers that the GPU machine lacks travel as wheels in .whl/ (bash scripts/fetch_wheels.sh).
# BENCH_OPS=kl,ppo,... limits (b) to those families (a second call measures what the first had no time for).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTRLHF_CACHE_DIR=${FASTRLHF_CACHE_DIR:-/tmp/fastrlhf-cache} MAX_JOBS=${MAX_JOBS:-8}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastrlhf-peers .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/fastrlhf-peers"
fi
{ nvidia-smi -L; date -u
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The CUDA extension builds in the background while (a) runs on the triton backend.
timeout 200 "$PY" -c "from fastrlhf import _cuda; ok, why = _cuda.status(); print('cuda backend:', ok, why)
print(_cuda.build_info() if ok else '')" > "$OUT/cuda.log" 2>&1 &
build=$!

echo "== (a) compiled correctness: the whole suite (CUDA parity in (c); sm_80/90 AOT compiles need no GPU)"
FASTRLHF_TEST_CUDA=0 timeout -s INT 180 "$PY" -m pytest -q -n 8 -p no:cacheprovider --maxfail=30 \
    tests --ignore=tests/test_cuda_parity.py -k "not compile_for_gpus" \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"

echo "== (e) end-to-end training phase (bench/e2e)"
mkdir -p "$OUT/e2e"
{ timeout -s INT 40 "$PY" -m bench.e2e --models qwen2.5-1.5b --methods grpo --length 1024 --reps 3 \
      --variants naive,fastrlhf,fastrlhf-1pass,trl,trl+fastrlhf,liger --no-frontier --max-seconds 28 --out "$OUT/e2e"
  timeout -s INT 50 "$PY" -m bench.e2e --models qwen2.5-1.5b --methods grpo --length 1024 --reps 1 \
      --checkpointing on --variants naive,fastrlhf --lengths 4096,16384,32768 --frontier-step 1024 \
      --max-seconds 38 --out "$OUT/e2e"; } > "$OUT/e2e/e2e.log" 2>&1
grep -E "^e2e-|frontier|Error" "$OUT/e2e/e2e.log" | tail -15
tar czf "$OUT/e2e.tgz" -C "$OUT/e2e" . && rm -rf "$OUT/e2e"

wait "$build"
echo "== (b) benchmarks"
timeout -s INT 150 "$PY" -m bench --quick --max-minutes 2 ${BENCH_OPS:+--ops "$BENCH_OPS"} --out "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
tail -25 "$OUT/bench.log"
tar czf "$OUT/bench.tgz" -C "$OUT/bench" . && rm -rf "$OUT/bench"

echo "== (c) CUDA extension and parity"
cat "$OUT/cuda.log"
timeout -s INT 60 "$PY" -m pytest -q -n 8 -p no:cacheprovider tests/test_cuda_parity.py \
    --junitxml="$OUT/cuda.xml" >> "$OUT/cuda.log" 2>&1
cp "$FASTRLHF_CACHE_DIR"/cuda/*/build-error.log "$OUT/" 2>/dev/null
tail -3 "$OUT/cuda.log"
ls -la "$OUT"
