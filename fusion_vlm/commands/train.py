"""``fusion-vlm train``: run one training stage from a YAML config (see docs/training.md)."""

from __future__ import annotations

import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage (contrastive / generation) with DeepSpeed")
    p.add_argument("--config", required=True,
                   help="train preset (stage1_contrastive, stage2_generation, stage3_finetune, tiny_stage1...) "
                        "or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. optim.lr=1.0e-5 or data.files=[a.json] (repeatable)")
    p.add_argument("--output-dir", help="shortcut for --set output_dir=DIR")
    p.add_argument("--init-from", help="start from this FusionVLM.from_pretrained directory (stage 3: stage-2 final)")
    p.add_argument("--n-queries", type=int, help="N for this run; N' follows the paper (min(N, 8)) unless given")
    p.add_argument("--n-queries-later", type=int, help="N' for this run")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--no-question", dest="use_question", action="store_false", default=None,
                   help="fusion module sees only vision tokens and query slots")
    q.add_argument("--question", dest="use_question", action="store_true", help="fuse the question (default)")
    p.add_argument("--resume", help="checkpoint or output directory to resume from ('never' to start fresh); "
                                    "default: resume when the output directory holds a checkpoint")
    p.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=N")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse_suppress())
    p.set_defaults(func=run)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def overrides_from_args(args) -> list[str]:
    """The command-line shortcuts as ``key=value`` overrides (applied after --set)."""
    out = list(args.overrides)
    if args.output_dir:
        out.append(f"output_dir={args.output_dir}")
    if args.init_from:
        out.append(f"init_from={args.init_from}")
    if args.n_queries is not None:
        out.append(f"n_queries={args.n_queries}")
        out.append(f"n_queries_later={args.n_queries_later if args.n_queries_later is not None else 'null'}")
    elif args.n_queries_later is not None:
        out.append(f"n_queries_later={args.n_queries_later}")
    if args.use_question is not None:
        out.append(f"use_question={str(args.use_question).lower()}")
    if args.resume:
        out.append(f"checkpoint.resume={args.resume}")
    if args.max_steps is not None:
        out.append(f"max_steps={args.max_steps}")
    return out


def run(args) -> int:
    from fusion_vlm.training.config import load_train_config
    from fusion_vlm.training.data import TooManySkipped
    from fusion_vlm.training.loop import NonFiniteLossError, train

    from fusion_vlm.errors import ConfigError, DataError, UserError, user_input

    with user_input(ConfigError):  # a missing preset / YAML file or a bad --set
        cfg = load_train_config(args.config, overrides_from_args(args))
    try:
        result = train(cfg)
    except TooManySkipped as err:  # the data: one line, no traceback
        raise DataError(str(err)) from None
    except NonFiniteLossError as err:  # the run diverged (learning rate, data): one line, no traceback
        raise UserError(str(err)) from None
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"steps": result.steps, "stopped": result.stopped, "skips": result.skips,
                          "nonfinite_steps": result.nonfinite_steps,
                          "final": str(result.final_dir) if result.final_dir else None,
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None}))
    return 0 if result.stopped in (None, "stop_at_step") else 143
