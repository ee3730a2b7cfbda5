#!/usr/bin/env bash
# Downloads, here, the pure-Python peers the GPU machine lacks into .whl/ (git-ignored; datasets,
# dill and multiprocess: TRL's fused head imports trl.trainer.utils in backward), for
# scripts/gpu_check.sh to install there: run the device call with carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    "trl==1.16.*" "liger-kernel" "cut-cross-entropy" datasets dill multiprocess
ls -la .whl
