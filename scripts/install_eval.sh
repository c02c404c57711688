#!/usr/bin/env bash
# Install the evaluation stack into a venv that can run every fusion-vlm command:
# torch, VLMEvalKit (as ms-vlmeval), and fusion_vlm editable with its core
# dependencies and the `train`, `eval` and `dev` extras of pyproject.toml.
#
#   bash scripts/install_eval.sh [VENV_DIR]      # default: <repo>/.venv-eval; reused if it exists
#   bash scripts/install_eval.sh .venv           # add evaluation to the training venv: one venv for all
#
# Idempotent: an existing venv is reused, torch and ms-vlmeval are skipped when
# the pinned versions are already there, and pip skips satisfied requirements.
# ms-vlmeval is installed with --no-deps (it declares ~68 dependencies, several
# of them unbuildable offline); the `eval` extra is the verified subset that
# `import vlmeval` and its image benchmarks need (docs/evaluation.md). The
# extras' pins fit the core ones, so the same venv trains, evaluates and fits;
# installed into .venv it moves transformers to the `eval` extra's pin.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${EVAL_VENV:-$REPO/.venv-eval}}"
PYTHON="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
VLMEVAL_PIN=ms-vlmeval==0.0.20
EXTRAS="${FUSION_VLM_EVAL_EXTRAS:-train,eval,dev}"   # train: DeepSpeed, wandb; dev: pytest

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

step "installing fusion_vlm[$EXTRAS] (editable, with its core dependencies) from $REPO"
"$PY" -m pip install -e "$REPO[$EXTRAS]"

step "checking: every requirement of fusion_vlm[$EXTRAS] is installed"
"$PY" - "$EXTRAS" <<'PY'
import importlib.metadata as md, sys
from packaging.requirements import Requirement
extras = set(sys.argv[1].split(","))
missing = []
for spec in md.requires("fusion_vlm") or []:
    req = Requirement(spec)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(version, prereleases=True):
        missing.append(f"{req} (found {version})")
if missing:
    sys.exit("install_eval.sh: unmet requirements: " + "; ".join(missing))
print("all requirements met")
PY

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
step "done: $VENV runs every fusion-vlm command (train, demo, eval, sweep, fit, ...);
run its tests with $VENV/bin/python -m pytest -m vlmeval tests/test_eval_vlmeval.py tests/test_eval_env_sweep_fit.py"
