"""``fusion-vlm train``: run one training stage from a YAML config (see docs/training.md).

Every field of :class:`~fusion_vlm.training.config.TrainConfig` is a flag generated from the schema
(``--max-steps 5``, ``--optim.lr 1e-5``, ``--data.files '[a.jsonl]'``); the flags given override the YAML.
"""

from __future__ import annotations

import argparse
import json
import os

from fusion_vlm.schema import add_config_arguments
from fusion_vlm.training.config import TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a stage (contrastive / generation) with DeepSpeed", allow_abbrev=False,
        usage="fusion-vlm train --config CONFIG [--FIELD VALUE ...]",
        description="Train one stage. Every config field is a flag (values are YAML: --max-steps 5, "
                    "--use-question false, --data.files '[a.jsonl]'); the flags given override the YAML file.")
    p.add_argument("--config", required=True,
                   help="train preset (stage1_contrastive, stage2_generation, stage3_finetune, tiny_stage1...) "
                        "or YAML path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from the DeepSpeed launcher; unused
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from fusion_vlm.errors import ConfigError, DataError, UserError, user_input
    from fusion_vlm.schema import overrides_from_namespace
    from fusion_vlm.training.config import load_train_config

    with user_input(ConfigError):  # a missing preset / YAML file or a bad flag value (before importing DeepSpeed)
        cfg = load_train_config(args.config, overrides_from_namespace(args, TrainConfig))
    from fusion_vlm.training.data import TooManySkipped
    from fusion_vlm.training.loop import NonFiniteLossError, train

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
