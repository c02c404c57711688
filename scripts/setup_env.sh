#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install fusion_vlm with
# the given extras. Idempotent: reinstalls only when pyproject.toml changed.
# Usage: source scripts/setup_env.sh [extras]   (default extras: train,dev)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSION_VLM_VENV:-$ROOT/.venv}"
EXTRAS="${1:-train,dev}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.fusion_vlm-$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing torch + torchvision (wheels on this machine's disk when available)"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  echo "[setup] installing fusion_vlm[$EXTRAS] (editable)"
  python -m pip install -q -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
