#!/usr/bin/env bash
# Installs what the tests need and runs the whole test suite (no GPU needed: Triton kernels
# run under the Triton interpreter; with a GPU they run compiled). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec "${PYTHON:-python3}" -m pytest -q -n auto tests "$@"
