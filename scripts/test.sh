#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow   or   scripts/test.sh tests/test_model.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" train,dev
cd "$ROOT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
if [ "$#" -eq 0 ]; then
  set -- -m "not slow and not vlmeval"
fi
# pytest exits 5 when it collected no test: that is a failure here, like any non-zero code.
python -m pytest -q "$@"
