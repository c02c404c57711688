#!/usr/bin/env bash
# Train on one node with all its GPUs through the DeepSpeed launcher.
#
#   scripts/launch_node.sh --config stage2_generation [--FIELD VALUE ...]   (e.g. --max-steps 10)
#
# Arguments are those of `fusion-vlm train`. Environment:
#   NUM_GPUS     GPUs to use (default: every GPU nvidia-smi lists)
#   MASTER_PORT  rendezvous port (default 29500; change it to run two jobs on one node)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
  echo "usage: scripts/launch_node.sh --config CONFIG [fusion-vlm train arguments]" >&2
  exit 2
fi
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
fi
if [ "${NUM_GPUS:-0}" -lt 1 ]; then
  echo "launch_node.sh: no GPU found (set NUM_GPUS, or train on the CPU with: python train/train.py ...)" >&2
  exit 2
fi
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" train/train.py "$@"
