#!/usr/bin/env python
"""Measured speed-ups of the fusion path at the paper's widths, side by side in one run (CPU, fp32).

1. Prefill: the same frozen LLM (width 4096, ``--llm-layers`` of Llama-2-7B's 32
   layers) fed (a) all 1450 merged vision tokens (LLaVA-style baseline) vs (b)
   the fusion module (1024 x 20 layers) plus N fused tokens, N in ``--n``. The
   cost model (fusion_vlm.tokens.cost) is evaluated for the same layer count.
2. A second question on the same image, with and without the vision-prefix KV
   reuse: its marginal cost as a fraction of the first question (vision tower
   ViT-H/14 on 10 views + merge + fusion + LLM prefill).
3. One training step (forward + backward) of the CPU demo's fusion module with
   the questions embedded in one table lookup per batch (the library) vs one
   lookup per question (before): each lookup's backward writes a dense
   [49408, H] gradient.

Random weights (timings do not depend on them). Prints tables; no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusion_vlm.config import load_model_config
from fusion_vlm.fusion import FusionModule
from fusion_vlm.merge import TokenMerge
from fusion_vlm.tokens import cost
from fusion_vlm.vision import VisionTower, build_clip


def timed(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` in seconds (after one warm-up call when ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_llm(layers: int) -> LlamaForCausalLM:
    """Llama-2-7B widths with ``layers`` decoder layers, random init, eval mode."""
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def llm_prefill(llm, n_tokens: int):
    """A closure running the LLM decoder over ``n_tokens`` input embeddings (last-token logits)."""
    x = torch.randn(1, n_tokens, 4096) * 0.02

    def run():
        h = llm.model(inputs_embeds=x, use_cache=True).last_hidden_state
        return llm.lm_head(h[:, -1])
    return run


def embedding_lookups(repeats: int, images: int = 8, questions: int = 9) -> None:
    """Section 3: per-question vs one-per-batch question lookups in a demo-size fusion training step."""
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
    print(f"\n[3] demo fusion (96 x 3 layers) training step, {images} images x {questions} questions, N = 4:")
    for name, t in times.items():
        print(f"  {name:<24} {t * 1e3:8.1f} ms")
    print(f"  speed-up {times['one lookup per question'] / times['one lookup per batch']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm-layers", type=int, default=4, help="LLM decoder layers to instantiate (Llama-2-7B: 32)")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 8, 64, 256], help="fused tokens N")
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="chat-template tokens around the question")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (median)")
    ap.add_argument("--skip-second-question", action="store_true")
    ap.add_argument("--only-embedding-lookups", action="store_true", help="run section 3 alone")
    args = ap.parse_args()
    torch.manual_seed(0)
    embedding_lookups(max(args.repeats, 5))
    if args.only_embedding_lookups:
        return
    q, p = args.question_tokens, args.prompt_tokens
    paper = load_model_config("paper")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LLM 4096 wide x {args.llm_layers} layers, "
          f"fusion {paper.fusion.hidden_size} x {paper.fusion.num_layers} layers; {q} question + {p} prompt tokens")
    llm_cfg = cost.TransformerConfig("llama-2-7b-cut", hidden=4096, layers=args.llm_layers, heads=32, kv_heads=32,
                                     intermediate=11008, vocab=32000)
    with torch.inference_mode():
        llm = build_llm(args.llm_layers)
        fusion = FusionModule(paper.fusion).eval()
        vision_tokens = torch.randn(1450, paper.fusion.hidden_size) * 0.02
        ids = list(range(1000, 1000 + q))
        t_base = timed(llm_prefill(llm, p + 1450 + q), args.repeats)
        print(f"\n[1] prefill: baseline LLM over {p + 1450 + q} tokens: {t_base:.3f} s")
        print(f"{'N':>5} {'fusion s':>9} {'LLM s':>8} {'total s':>8} {'measured x':>11} {'predicted x':>12} "
              f"{'meas/pred':>10} {'predicted x (32 layers)':>24}")
        t_fusion, t_llm = {}, {}
        for n in args.n:
            t_fusion[n] = timed(lambda: fusion([vision_tokens], [[ids]], n, n), args.repeats)
            t_llm[n] = timed(llm_prefill(llm, p + n + q), args.repeats)
            measured = t_base / (t_fusion[n] + t_llm[n])
            pred = cost.prefill_speedup(n, question_tokens=q, prompt_tokens=p, llm=llm_cfg, vision_width=1024).speedup
            full = cost.prefill_speedup(n, question_tokens=q, prompt_tokens=p, vision_width=1024).speedup
            print(f"{n:>5} {t_fusion[n]:>9.3f} {t_llm[n]:>8.3f} {t_fusion[n] + t_llm[n]:>8.3f} {measured:>10.2f}x "
                  f"{pred:>11.2f}x {measured / pred:>10.2f} {full:>23.2f}x")
        if args.skip_second_question:
            return
        vcfg = paper.vision
        clip = build_clip(vcfg.__class__(**{**vcfg.__dict__, "pretrained": None}), 336)
        tower = VisionTower(clip.visual, vcfg, paper.fusion.hidden_size).eval()
        merge = TokenMerge(paper.fusion.hidden_size, paper.merge).eval()
        views = torch.randn(10, 3, 336, 336)
        t_vision = timed(lambda: merge(tower(views)), 1, warmup=False)
        t_prefix = timed(lambda: fusion.encode_prefix(vision_tokens), args.repeats)
        prefix = fusion.encode_prefix(vision_tokens)
        print(f"\n[2] second question on the same image: vision tower + merge on 10 views {t_vision:.2f} s, "
              f"fusion vision prefix {t_prefix:.3f} s")
        scale = 32 / args.llm_layers
        print(f"{'N':>5} {'first q s':>10} {'2nd, no reuse':>14} {'2nd, reuse':>11} {'marginal':>9} "
              f"{'marginal (LLM at 32 layers)':>28}")
        for n in args.n:
            t_suffix = timed(lambda: fusion.fuse_with_prefix(prefix, [ids], n), args.repeats)
            first = t_vision + t_fusion[n] + t_llm[n]
            no_reuse = t_fusion[n] + t_llm[n]  # vision tokens kept, fusion recomputed over all 1450
            reuse = t_suffix + t_llm[n]
            first32 = t_vision + t_fusion[n] + t_llm[n] * scale
            print(f"{n:>5} {first:>10.3f} {no_reuse:>14.3f} {reuse:>11.3f} {reuse / first:>8.1%} "
                  f"{(t_suffix + t_llm[n] * scale) / first32:>27.1%}")


if __name__ == "__main__":
    main()
