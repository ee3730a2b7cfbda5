#!/usr/bin/env bash
# Installs fastrlhf (editable) with the extras named in $1, e.g. "test" or "pipeline".
# The torch already installed is used as it is. Where there is none, torch is installed
# first, pinned to 2.13.0 (override with FASTRLHF_TORCH="torch==X"): on a machine whose pip
# is configured with a local CPU wheel, that wheel is taken instead of a multi-gigabyte
# CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "fastrlhf: no torch found; installing ${FASTRLHF_TORCH:-torch==2.13.0}"
    "$PY" -m pip install -q "${FASTRLHF_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[${1:-test}]"
