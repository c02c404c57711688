#!/usr/bin/env bash
# Train on several nodes listed in a DeepSpeed hostfile (run on the first node).
#
#   HOSTFILE=hostfile scripts/launch_multinode.sh --config stage2_generation [--FIELD VALUE ...]   (e.g. --max-steps 10)
#
# hostfile, one line per node:   node-a slots=8
#                                node-b slots=8
# Needs: passwordless ssh from this node to the others (pdsh launcher), the same checkout and
# virtualenv path on every node, and a shared file system for `output_dir` (checkpoints are
# renamed into place by rank 0). Environment:
#   HOSTFILE     path of the hostfile (required)
#   MASTER_ADDR  address of this node as the others see it (default: first host in the hostfile)
#   MASTER_PORT  rendezvous port (default 29500)
#   LAUNCHER     pdsh (default) | openmpi | mvapich | slurm  (DeepSpeed multi-node launchers)
# Variables such as NCCL_SOCKET_IFNAME / NCCL_IB_HCA go to every node through a `.deepspeed_env`
# file (KEY=VALUE lines) in this directory or your home directory.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines like: node-a slots=8)}"
if [ ! -f "$HOSTFILE" ]; then
  echo "launch_multinode.sh: hostfile '$HOSTFILE' does not exist" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "usage: HOSTFILE=hostfile scripts/launch_multinode.sh --config CONFIG [fusion-vlm train arguments]" >&2
  exit 2
fi
FIRST_HOST=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
NNODES=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF' | wc -l)
exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NNODES" --launcher "${LAUNCHER:-pdsh}" \
  --master_addr "${MASTER_ADDR:-$FIRST_HOST}" --master_port "${MASTER_PORT:-29500}" \
  train/train.py "$@"
