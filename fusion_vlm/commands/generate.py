"""``fusion-vlm generate``: answer questions about images with a checkpoint.

Single image::

    fusion-vlm generate --checkpoint DIR --image IMG --question Q [--question Q2] [--n-queries N] [--no-question]

Batch: ``--input requests.jsonl --output answers.jsonl`` where every input line
is ``{"image": PATH, "questions": [Q, ...]}``; every output line repeats it
with ``"answers": [A, ...]``. Several questions of one image form one
multi-turn conversation (N query slots for the first, N' for the later ones).
"""

from __future__ import annotations

import argparse


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding options shared by generate, eval and sweep."""
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer (default 64)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer questions about images with a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory written by FusionVLM.save_pretrained")
    p.add_argument("--image", help="one image file")
    p.add_argument("--question", action="append", default=[],
                   help="question about --image; repeat for a multi-turn conversation")
    p.add_argument("--input", help="JSONL of {image, questions} requests (batch form)")
    p.add_argument("--output", help="JSONL to write answers to (batch form; default: stdout lines)")
    p.add_argument("--n-queries", type=int, default=None, help="N query slots (default: the checkpoint's)")
    p.add_argument("--n-queries-later", type=int, default=None, help="N' slots for later questions")
    p.add_argument("--no-question", action="store_true",
                   help="drop the question from the fusion input (the vq / vq_ft modes)")
    add_generation_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from fusion_vlm.evaluation.runner import GenerationSettings, Runner, answer_file, read_requests

    if bool(args.image) == bool(args.input):
        raise ValueError("give either --image with --question, or --input JSONL")
    if args.image and not args.question:
        raise ValueError("--image needs at least one --question")
    if args.input and args.question:
        raise ValueError("--question goes with --image; put the questions of --input in its JSONL lines")
    if args.image:
        from pathlib import Path

        if not Path(args.image).is_file():
            raise FileNotFoundError(f"image not found: {args.image}")
    else:
        list(read_requests(args.input))  # validate before loading the model
    settings = GenerationSettings(n_queries=args.n_queries, n_queries_later=args.n_queries_later,
                                  use_question=not args.no_question, max_new_tokens=args.max_new_tokens,
                                  do_sample=args.do_sample, batch_size=args.batch_size)
    runner = Runner(args.checkpoint, settings, device=args.device)
    if args.image:
        answers = runner.answer([args.image], [args.question])[0]
        for q, a in zip(args.question, answers):
            print(f"Q: {q}\nA: {a}")
        return 0
    if args.output:
        n = answer_file(runner, args.input, args.output)
        print(f"wrote {n} answers to {args.output}")
        return 0
    import json

    records = [rec for _, rec in read_requests(args.input)]
    answers = runner.answer([r["image"] for r in records], [r["questions"] for r in records])
    for rec, ans in zip(records, answers):
        print(json.dumps({**rec, "answers": ans}, ensure_ascii=False))
    return 0
