#!/usr/bin/env bash
# Install the evaluation stack (VLMEvalKit as ms-vlmeval + the `eval` extra) into a venv.
#
#   bash scripts/install_eval.sh [VENV_DIR]      # default: <repo>/.venv-eval; reused if it exists
#
# Idempotent: an existing venv is reused, torch and ms-vlmeval are skipped when
# the pinned versions are already there, and pip skips satisfied requirements.
# ms-vlmeval is installed with --no-deps (it declares ~68 dependencies, several
# of them unbuildable offline); EVAL_DEPS below is the verified subset that
# `import vlmeval` and its image benchmarks need (docs/evaluation.md). Keep it
# in sync with the `eval` extra of pyproject.toml.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${EVAL_VENV:-$REPO/.venv-eval}}"
PYTHON="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
VLMEVAL_PIN=ms-vlmeval==0.0.20
EVAL_DEPS=(
  pandas==3.1.1 tabulate==0.10.0 termcolor==3.3.0 sty==1.0.6 validators==0.36.0
  huggingface_hub==2.4.0 requests==2.34.2 openai==3.54.0 portalocker==4.4.2 datasets==5.2.0
  timeout-decorator==0.5.0 levenshtein==0.27.5 joblib==1.6.0 decord==0.6.0 jieba==0.42.1
  nltk==3.10.4 rouge==1.0.1 math-verify==0.9.0 pylatexenc==2.11 opencv-python-headless==5.0.0.93
  imageio==2.38.1 scipy==1.17.1 json_repair==0.64.5 num2words==0.5.14 scikit-learn==1.9.1
  transformers==5.23.0 accelerate==1.15.0 qwen-vl-utils==0.0.14 pycocoevalcap==1.2
)
CORE_DEPS=(open_clip_torch safetensors pyyaml pytest)

step() { printf '\n== %s\n' "$*"; }

if [[ -x "$VENV/bin/python" ]]; then
  step "reusing venv $VENV"
else
  step "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { echo "install_eval.sh: $VENV has Python < 3.10" >&2; exit 1; }

# torch's CUDA build takes 5.5 GB. When the training venv (scripts/setup_env.sh)
# already has the pinned torch on the same disk, hard-link its files here instead
# of a second copy; pip then sees torch installed and adds only what is missing.
MAIN_PY="${FUSION_VLM_VENV:-$REPO/.venv}/bin/python"
if [[ -x "$MAIN_PY" && "$MAIN_PY" != "$PY" ]] && ! "$PY" -c 'import torch' 2>/dev/null \
   && "$MAIN_PY" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
  step "hard-linking torch, torchvision and their CUDA libraries from $(dirname "$(dirname "$MAIN_PY")")"
  SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$MAIN_PY" - "$SITE" <<'PY' || echo "install_eval.sh: hard links not possible here; pip installs a copy instead"
import importlib.metadata as md, os, re, sys
target, made = sys.argv[1], []
wanted = re.compile(r"(torch|torchvision|triton|nvidia[-_].*|cuda[-_].*)")
try:
    for dist in md.distributions():
        if not wanted.fullmatch(dist.metadata["Name"].lower()):
            continue
        for f in dist.files or []:
            src, dst = dist.locate_file(f), os.path.join(target, str(f))
            if str(f).startswith("..") or not os.path.isfile(src) or os.path.exists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(src, dst)
            made.append(dst)
except OSError as err:  # e.g. the two venvs on different file systems
    for path in made:
        os.unlink(path)
    sys.exit(f"hard link failed ({err}); removed the {len(made)} links made")
print(f"linked {len(made)} files")
PY
fi

if "$PY" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
  step "torch 2.14.1 already installed"
else
  step "installing ${TORCH_PINS[*]} (from the machine's local wheel index when pip is configured with one)"
  "$PY" -m pip install "${TORCH_PINS[@]}"
fi

if "$PY" -m pip show ms-vlmeval 2>/dev/null | grep -qx 'Version: 0.0.20'; then
  step "$VLMEVAL_PIN already installed"
else
  step "installing $VLMEVAL_PIN without its declared dependencies"
  "$PY" -m pip install --no-deps "$VLMEVAL_PIN"
fi

step "installing the eval dependencies"
"$PY" -m pip install "${EVAL_DEPS[@]}" "${CORE_DEPS[@]}"

step "installing fusion_vlm (editable, no deps) from $REPO"
"$PY" -m pip install --no-deps -e "$REPO"

step "checking: import vlmeval (takes a few seconds)"
PRED_FORMAT=tsv "$PY" - <<'PY'
import ssl
before = ssl._create_default_https_context
from fusion_vlm.evaluation.registry import import_vlmeval
vlmeval = import_vlmeval()
assert ssl._create_default_https_context is before, "default SSL context not restored"
from vlmeval.config import supported_VLM
print(f"vlmeval OK ({len(supported_VLM)} models known) at {vlmeval.__file__}")
PY
step "done: run the eval tests with $VENV/bin/python -m pytest -m vlmeval tests/test_eval_vlmeval.py"
