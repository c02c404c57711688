#!/usr/bin/env python
"""Measured vs predicted peak memory of one stage-2 training step (CPU, bf16), with and without checkpointing.

The paper's widths at reduced depth (ViT-H/14 x 4 blocks, fusion 1024 x 2 layers,
Llama-2-7B 4096 x 2 layers), an HD-9 image (10 views), 4 questions, micro-batch 1.
How it measures and what it compares: fusion_vlm/training/memory_bench.py.
Takes 2-4 minutes on 2 cores and about 8 GiB of memory.
"""

from __future__ import annotations

import argparse
import json

from fusion_vlm.training.memory_bench import run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm-tokens", type=int, default=1024, help="LLM tokens of the sample (default 1024)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    rows = run_bench(args.llm_tokens, args.threads)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    s = rows[0]["shape"]
    print(f"one sample: {s['views']} views, {s['n_questions']} questions of {s['question_tokens']:.0f} fusion "
          f"tokens, {s['llm_tokens']} LLM tokens ({s['answer_fraction']:.0%} labelled), bf16")
    print(f"{'LLM/vision/fusion checkpointing':<34}{'measured GiB':>14}{'predicted GiB':>15}{'ratio':>8}")
    for r in rows:
        print(f"{'on' if r['checkpointing'] else 'off':<34}{r['measured_gib']:>14.2f}{r['predicted_gib']:>15.2f}"
              f"{r['ratio']:>8.2f}")
        parts = {"gradients": r["gradients_gib"], **r["activation_parts"]}
        print("    predicted by part: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
