#!/usr/bin/env bash
# Stage-3 sweep (paper Appendix C, step 3): one fine-tune of the stage-2 model per N(N'),
# with the question fused and without it, on the same seeded 10% subset.
#
#   scripts/sweep_stage3.sh [extra fusion-vlm train arguments]
#
# Environment (defaults in brackets):
#   STAGE2  stage-2 export to start from        [runs/stage2_generation/final]
#   OUT     root of the per-run output dirs      [runs/stage3]  -> $OUT/n64_question, $OUT/n64_noquestion ...
#   CONFIG  train config                         [stage3_finetune]
#   NS      "N:N' ..." list                      [the paper's: 768:8 512:8 384:8 256:8 128:8 64:8 32:8 16:8 8:8 1:1]
#   MODES   "question noquestion" or one of them [question noquestion]
#   LAUNCH  command that takes train arguments   [scripts/launch_node.sh]  (CPU: "python train/train.py")
# A run whose final export exists is skipped; an interrupted run resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE2=${STAGE2:-runs/stage2_generation/final}
OUT=${OUT:-runs/stage3}
CONFIG=${CONFIG:-stage3_finetune}
NS=${NS:-"768:8 512:8 384:8 256:8 128:8 64:8 32:8 16:8 8:8 1:1"}
MODES=${MODES:-"question noquestion"}
LAUNCH=${LAUNCH:-scripts/launch_node.sh}
for pair in $NS; do
  N=${pair%%:*}
  NP=${pair##*:}
  for mode in $MODES; do
    case "$mode" in
      question) flag=--question ;;
      noquestion) flag=--no-question ;;
      *) echo "sweep_stage3.sh: unknown mode '$mode' (question | noquestion)" >&2; exit 2 ;;
    esac
    dir="$OUT/n${N}_${mode}"
    if [ -f "$dir/final/model.safetensors" ]; then
      echo "[sweep] $dir done, skipping"
      continue
    fi
    echo "[sweep] N=$N N'=$NP $mode -> $dir"
    $LAUNCH --config "$CONFIG" --init-from "$STAGE2" --n-queries "$N" --n-queries-later "$NP" $flag \
      --output-dir "$dir" "$@"
  done
done
