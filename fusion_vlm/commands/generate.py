"""``fusion-vlm generate``: answer questions about images with a checkpoint.

Single image::

    fusion-vlm generate --checkpoint DIR --image IMG --question Q [--question Q2] [--n-queries N] [--no-question]

Batch: ``--input requests.jsonl --output answers.jsonl`` where every input line
is ``{"image": PATH, "questions": [Q, ...]}``; every output line repeats it
with ``"answers": [A, ...]``. Several questions of one image form one
multi-turn conversation (N query slots for the first, N' for the later ones).
A request whose image cannot be read gets an ``"error"`` field instead of
``"answers"``; the others are still answered.

Exit codes: 0 all answered; 2 bad input (one line on stderr naming it: a bad
argument, checkpoint, requests file or the --image); 3 batch form only: some
requests have an ``"error"`` field (the others were answered).

A checkpoint whose LLM ships its own Python code is refused unless
``--trust-remote-code`` is given.
"""

from __future__ import annotations

import argparse
import sys


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding options shared by generate, eval and sweep."""
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer (default 64)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


PARTIAL_FAILURE = 3  # exit code: some requests of --input have an "error" field


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``: the only way a loaded checkpoint's LLM may run its own Python code."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's LLM to run the Python code it ships (off by default; "
                        "a checkpoint's config cannot turn it on)")


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
    p.add_argument("--dtype", choices=["llm", "float32", "bfloat16"], default=None,
                   help="precision of vision tower, merge, fusion and projector (default: as saved, float32); "
                        "llm: the LLM's (bfloat16), much faster on a CPU")
    add_generation_arguments(p)
    add_trust_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from fusion_vlm.errors import MissingFileError, UsageError, user_input
    from fusion_vlm.evaluation.runner import GenerationSettings, Runner, answer_requests, read_requests
    from fusion_vlm.images import load_image

    if bool(args.image) == bool(args.input):
        raise UsageError("give either --image with --question, or --input JSONL")
    if args.image and not args.question:
        raise UsageError("--image needs at least one --question")
    if args.input and args.question:
        raise UsageError("--question goes with --image; put the questions of --input in its JSONL lines")
    image = None
    if args.image:
        if not Path(args.image).is_file():
            raise MissingFileError(f"image not found: {args.image}")
        image = load_image(args.image)  # a bad image fails here, before the model is loaded
    else:
        list(read_requests(args.input))  # validate before loading the model
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")
    settings = GenerationSettings(n_queries=args.n_queries, n_queries_later=args.n_queries_later,
                                  use_question=not args.no_question, max_new_tokens=args.max_new_tokens,
                                  do_sample=args.do_sample, batch_size=args.batch_size, dtype=args.dtype)
    runner = Runner(args.checkpoint, settings, device=args.device, trust_remote_code=args.trust_remote_code)
    with user_input(UsageError):  # --n-queries / --n-queries-later out of the checkpoint's range
        runner.model.processor.resolve(args.n_queries, args.n_queries_later, not args.no_question)
    if image is not None:
        answers = runner.answer([runner.load_image(image)], [args.question])[0]
        for q, a in zip(args.question, answers):
            print(f"Q: {q}\nA: {a}")
        return 0
    records = answer_requests(runner, args.input)
    lines = [json.dumps(rec, ensure_ascii=False) for rec in records]
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(line + "\n" for line in lines))
    else:
        print("\n".join(lines))
    failed = [rec for rec in records if "error" in rec]
    if args.output:
        print(f"wrote {len(records)} records to {args.output} ({len(records) - len(failed)} answered, "
              f"{len(failed)} with an error)")
    for rec in failed:
        print(f"fusion-vlm generate: error: {rec['error']}", file=sys.stderr)
    return PARTIAL_FAILURE if failed else 0
