#!/usr/bin/env bash
# Installs fastrlhf and runs its main job: the environment report and a first example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh pipeline
fastrlhf info
"${PYTHON:-python3}" - <<'PY'
import torch, fastrlhf
logits = torch.randn(2, 6, 32000)
labels = torch.randint(0, 32000, (2, 6))
logp, entropy = fastrlhf.token_logprobs(logits, labels, return_entropy=True)
print("token log-probs:", logp[0].tolist())
print("entropy        :", entropy[0].tolist())
PY
