#!/usr/bin/env python
"""Measured cost of every inference stage at the paper's widths, beside the cost model (CPU, random weights).

Times vision tower, merge, fusion (first question; later question with the vision prefix reused), LLM
prefill and decode per N, and the LLaVA-style baseline (LLM prefill of all 1450 merged vision tokens),
alternating the stages over ``--rounds`` rounds (medians), with peak memory per stage; prints the tables
and the fused-prefill speed-up ratio (measured / predicted) per N, and writes ``--json`` for
``fusion-vlm fit --costs``. The logic lives in :mod:`fusion_vlm.bench`. ``--embedding-lookups`` also
times a demo-size fusion training step with one question-embedding lookup per batch vs per question.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fusion_vlm.bench import BenchSetup, format_report, run_stage_bench
from fusion_vlm.config import load_model_config
from fusion_vlm.fusion import FusionModule


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def embedding_lookups(repeats: int, images: int = 8, questions: int = 9) -> None:
    """Per-question vs one-per-batch question lookups in a demo-size fusion training step."""
    cfg = load_model_config("tiny", ["fusion.hidden_size=96", "fusion.num_layers=3", "fusion.intermediate_size=192"])
    fusion = FusionModule(cfg.fusion).train()
    vision = [torch.randn(85, 96) for _ in range(images)]
    qs = [[list(range(1000 + i, 1010 + i)) for i in range(questions)] for _ in range(images)]
    batched = fusion.embed_questions

    def per_question(questions):
        return [fusion.embed_tokens(torch.as_tensor(q)) for q in questions]

    def step():
        fusion.zero_grad(set_to_none=True)
        torch.cat([g for sample in fusion(vision, qs, 4, 4).groups for g in sample]).sum().backward()

    times = {}
    for name, embed in (("one lookup per question", per_question), ("one lookup per batch", batched)):
        fusion.embed_questions = embed
        times[name] = timed(step, repeats)
    fusion.embed_questions = batched
    print(f"\ndemo fusion (96 x 3 layers) training step, {images} images x {questions} questions, N = 4:")
    for name, t in times.items():
        print(f"  {name:<24} {t * 1e3:8.1f} ms")
    print(f"  speed-up {times['one lookup per question'] / times['one lookup per batch']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    d = BenchSetup()
    ap.add_argument("--n", type=int, nargs="+", default=list(d.n_values), help="fused tokens N")
    ap.add_argument("--vision-layers", type=int, default=d.vision_layers, help="ViT-H/14 blocks (paper: 32)")
    ap.add_argument("--fusion-layers", type=int, default=d.fusion_layers, help="fusion blocks (paper: 20)")
    ap.add_argument("--llm-layers", type=int, default=d.llm_layers, help="Llama-2-7B layers (paper: 32)")
    ap.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32", "model"],
                    help="precision of every stage, both paths (default: the paper's llm.dtype, bfloat16); "
                         "model: as FusionVLM runs by default (vision, merge, fusion float32; LLM llm.dtype)")
    ap.add_argument("--attention", default=d.attention, choices=["sdpa_blocked", "sdpa"],
                    help="attention of the fusion module and the LLM, both paths (default: sdpa, PyTorch's kernel, "
                         "as FusionVLM runs by default; sdpa_blocked: fusion_vlm.attention)")
    ap.add_argument("--question-tokens", type=int, default=d.question_tokens)
    ap.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="chat-template tokens")
    ap.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds (medians), after a warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", metavar="OUT.json", default=None, help="write the report (for fusion-vlm fit --costs)")
    ap.add_argument("--embedding-lookups", action="store_true", help="also time the question-lookup comparison")
    args = ap.parse_args()
    if args.embedding_lookups:
        embedding_lookups(5)
    setup = BenchSetup(tuple(args.n), args.vision_layers, args.fusion_layers, args.llm_layers, args.dtype,
                       args.question_tokens, args.prompt_tokens, rounds=args.rounds, threads=args.threads,
                       attention=args.attention)
    print(f"torch {torch.__version__}; paper widths (ViT-H/14 1280 at 336 px, fusion 1024, Llama-2-7B 4096)")
    report = run_stage_bench(setup)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
