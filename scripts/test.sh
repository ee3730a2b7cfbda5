#!/usr/bin/env bash
# Installs what the tests need and runs the whole test suite (no GPU needed: Triton kernels
# run under the Triton interpreter; with a GPU they run compiled). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh test
# Every Triton kernel is also compiled (for sm_80/sm_90, no GPU needed) with the oldest
# Triton fastrlhf supports, in a small side environment; skipped if it cannot be installed.
OLD=.cache/triton-3.6
if [ ! -x "$OLD/bin/python" ] && "$PY" -c "import triton" >/dev/null 2>&1; then
    ("$PY" -m venv --system-site-packages "$OLD" && "$OLD/bin/python" -m pip install -q "triton==3.6.0") \
        || { echo "fastrlhf: could not set up Triton 3.6 for the compile check; skipping it"; rm -rf "$OLD"; }
fi
[ -x "$OLD/bin/python" ] && export FASTRLHF_AOT_PYTHONS="$PWD/$OLD/bin/python"
exec "$PY" -m pytest -q -n auto tests "$@"
