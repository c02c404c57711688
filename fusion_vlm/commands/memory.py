"""``fusion-vlm memory``: per-GPU memory estimate of a training stage (see fusion_vlm/training/memory.py)."""

from __future__ import annotations

import json

from fusion_vlm.errors import ConfigError, UsageError, user_input


def register(subparsers) -> None:
    p = subparsers.add_parser("memory", help="estimate per-GPU training memory (weights, grads, optimizer, "
                                             "activations) for a train config")
    p.add_argument("--config", default="stage2_generation", help="train preset or YAML (default stage2_generation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train config override (repeatable), e.g. model=paper")
    p.add_argument("--model", help="model preset/YAML (default: the train config's `model`)")
    p.add_argument("--micro-batch", type=int, help="per-GPU micro-batch (default: the config's)")
    p.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3], help="ZeRO stage (default 2)")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (default 8)")
    p.add_argument("--gpu-gib", type=float, default=40.0, help="memory of one GPU for the verdict (default 40)")
    p.add_argument("--no-grad-checkpointing", action="store_true", help="estimate without activation checkpointing")
    p.add_argument("--llm-tokens", type=int, default=2048, help="LLM tokens per sample (default 2048)")
    p.add_argument("--questions", type=int, default=4, help="question groups per sample (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from fusion_vlm.config import load_model_config
    from fusion_vlm.training.config import load_train_config
    from fusion_vlm.training.memory import estimate_memory, format_estimate

    for flag, value in (("--gpus", args.gpus), ("--micro-batch", args.micro_batch), ("--llm-tokens", args.llm_tokens),
                        ("--questions", args.questions)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")
    with user_input(ConfigError):  # a missing preset / YAML file or a bad --set
        tcfg = load_train_config(args.config, args.overrides)
        overrides = [o for o in tcfg.model_overrides_all()
                     if not o.startswith(("vision.grad", "fusion.grad", "llm.grad"))]
        if tcfg.stage == "generation":  # as the training loop builds it (stage 1 follows llm.load)
            overrides.append("llm.load=true")
        mcfg = load_model_config(args.model or tcfg.model, overrides)
    zero = args.zero if args.zero is not None else (tcfg.engine.zero_stage if tcfg.engine.zero_stage is not None else 2)
    est = estimate_memory(mcfg, tcfg, args.micro_batch, zero, args.gpus, not args.no_grad_checkpointing,
                          n_questions=args.questions, llm_tokens=args.llm_tokens)
    if args.json:
        print(json.dumps({**est.as_dict(), "gpu_gib": args.gpu_gib, "fits": est.fits(args.gpu_gib)}, indent=2))
    else:
        print(format_estimate(est, args.gpu_gib))
    return 0
