"""Thin script form of ``fusion-vlm eval`` (same arguments), for running from a checkout.

Defaults follow the authors' evaluation: VLMEvalKit's own prompts (``--prompt-set vlmeval``) and the
per-benchmark answer length (``--max-new-tokens`` unset); see docs/evaluation.md.

    python eval/run_vlmeval.py --checkpoint DIR --data POPE MMStar --data-root ~/LMUData
"""

import sys

from fusion_vlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
