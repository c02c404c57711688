"""Thin training entry point for launchers: ``deepspeed train/train.py --config ...``.

Same arguments as ``fusion-vlm train`` (see docs/training.md); the DeepSpeed
launcher's ``--local_rank`` is accepted and ignored (the rank comes from the
environment).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fusion_vlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
