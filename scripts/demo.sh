#!/usr/bin/env bash
# Installs fastrlhf and runs its main job: the environment report, then the end-to-end demo
# (SFT -> reward model -> best-of-N, DPO, PPO, GRPO, RLOO and Dr. GRPO on the embedded task,
# checked against the exact optimum). Extra args go to `fastrlhf demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh pipeline
"${PYTHON:-python3}" -m fastrlhf info
exec "${PYTHON:-python3}" -m fastrlhf demo "$@"
