#!/usr/bin/env bash
# Stage-3 sweep (paper Appendix C, step 3): one fine-tune per N(N') on the same seeded 10% subset,
# with the question fused ("question": evaluated as modes vqq and vq) and without it
# ("noquestion": evaluated as mode vq_ft, "Vision Queries (ft)").
#
#   scripts/sweep_stage3.sh [extra fusion-vlm train arguments]
#
# Where the runs without the question start (VQ_FT_FROM):
#   stage2  (default) the stage-2 model, like the runs with the question: Appendix C fine-tunes every
#           configuration from the step-2 model on the 10% subset and does the without-question runs on
#           the same subset with the same settings, so the two runs of an N differ only in the question.
#   stage3  the with-question stage-3 model of the same N ($OUT/n<N>_question/final): the paper's
#           "further refined without the question" read as a continuation of that model. It is trained
#           first in the loop; with MODES=noquestion it must already exist.
#
# Environment (defaults in brackets):
#   STAGE2      stage-2 export to start from        [runs/stage2_generation/final]
#   OUT         root of the per-run output dirs      [runs/stage3]  -> $OUT/n64_question, $OUT/n64_noquestion ...
#   CONFIG      train config                         [stage3_finetune]
#   NS          "N:N' ..." list                      [the paper's: 768:8 512:8 384:8 256:8 128:8 64:8 32:8 16:8 8:8 1:1]
#   MODES       "question noquestion" or one of them [question noquestion]
#   VQ_FT_FROM  start of the noquestion runs         [stage2]  (stage2 | stage3, see above)
#   LAUNCH      command that takes train arguments   [scripts/launch_node.sh]  (CPU: "python train/train.py")
#   DRY_RUN     1: print each command ("[dry-run] ...") instead of running it   [0]
# A run whose final export exists is skipped; an interrupted run resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE2=${STAGE2:-runs/stage2_generation/final}
OUT=${OUT:-runs/stage3}
CONFIG=${CONFIG:-stage3_finetune}
NS=${NS:-"768:8 512:8 384:8 256:8 128:8 64:8 32:8 16:8 8:8 1:1"}
MODES=${MODES:-"question noquestion"}
VQ_FT_FROM=${VQ_FT_FROM:-stage2}
LAUNCH=${LAUNCH:-scripts/launch_node.sh}
DRY_RUN=${DRY_RUN:-0}
case "$VQ_FT_FROM" in
  stage2|stage3) ;;
  *) echo "sweep_stage3.sh: VQ_FT_FROM='$VQ_FT_FROM': expected stage2 or stage3" >&2; exit 2 ;;
esac
read -r -a launch <<< "$LAUNCH"
for pair in $NS; do
  N=${pair%%:*}
  NP=${pair##*:}
  for mode in $MODES; do
    init=$STAGE2
    case "$mode" in
      question) use_question=true ;;
      noquestion)
        use_question=false
        if [ "$VQ_FT_FROM" = stage3 ]; then init="$OUT/n${N}_question/final"; fi ;;
      *) echo "sweep_stage3.sh: unknown mode '$mode' (question | noquestion)" >&2; exit 2 ;;
    esac
    dir="$OUT/n${N}_${mode}"
    if [ -f "$dir/final/model.safetensors" ]; then
      echo "[sweep] $dir done, skipping"
      continue
    fi
    if [ "$DRY_RUN" != 1 ] && [ "$init" != "$STAGE2" ] && [ ! -f "$init/model.safetensors" ]; then
      echo "sweep_stage3.sh: VQ_FT_FROM=stage3 needs $init (run MODES=question first)" >&2
      exit 2
    fi
    echo "[sweep] N=$N N'=$NP $mode from $init -> $dir"
    cmd=("${launch[@]}" --config "$CONFIG" --init-from "$init" --n-queries "$N" --n-queries-later "$NP"
         --use-question "$use_question" --output-dir "$dir" "$@")
    if [ "$DRY_RUN" = 1 ]; then
      echo "[dry-run] ${cmd[*]}"
    else
      "${cmd[@]}"
    fi
  done
done
