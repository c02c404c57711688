#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the main job on the CPU: the demo
# (10-20 minutes; --quick 4-5). Extra arguments go to `fusion-vlm demo`, e.g. --quick,
# --config quick|full|PATH (configs/demo/), --set stage1.steps=50, --seed 1 or --out DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" train,dev
cd "$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
fusion-vlm demo "$@"
