"""The demo's training stages: a demo config + stage kind -> a TrainConfig, run through the real entry point.

Used by the pipeline (:mod:`fusion_vlm.demo.pipeline`) for stages 1-3 and by the baselines
(:mod:`fusion_vlm.demo.baselines`).
"""

from __future__ import annotations

from pathlib import Path

from fusion_vlm.demo.config import DemoConfig, StageConfig, load_demo_config
from fusion_vlm.schema import from_dict


def stage_settings(size, stage: str) -> StageConfig:
    """The stage settings of ``size`` for a stage of kind ``stage``: ``size.stage_for(stage)`` when ``size`` is a
    :class:`DemoConfig`, else those of the full preset (an object with only micro_batch, lr and n_values)."""
    cfg = size if isinstance(size, DemoConfig) else load_demo_config("full")
    return cfg.stage_for(stage)


def stage_train_config(stage: str, out: Path, data_dir: Path, size, steps: int, seed: int,
                  settings: StageConfig | None = None, **extra):
    """The TrainConfig of one demo stage (``stage``: contrastive | generation) of ``steps`` steps.

    ``size``: a :class:`DemoConfig` or any object with ``micro_batch``, ``lr`` and ``n_values``;
    ``settings``: warm-up, lr scales and train fraction (default :func:`stage_settings`); ``extra``:
    further TrainConfig fields (``data`` is merged into the data section).
    """
    from fusion_vlm.training.config import TrainConfig

    settings = settings or stage_settings(size, stage)
    # Every stage asks each question of an image on its own (N slots after it; in stages 2-3 one LLM row per
    # question), as the evaluation asks them and as the stand-in LLM read them in stage 0, all from one vision
    # pass per image. With whole conversations, or one question per sample, stages 2-3 did not pass stage 1's
    # answers to the LLM, and a stage 1 fused as conversations (N slots, then N') left N = 1 untrained
    # (docs/demo.md, "Why each choice")
    data = {"files": [str(data_dir / "train.jsonl")], "image_root": str(data_dir), "shuffle": True,
            "independent_questions": True}
    if settings.fraction < 1.0:
        data.update({"fraction": settings.fraction, "fraction_seed": seed})
    data.update(extra.pop("data", {}))
    cfg = {
        "stage": stage, "output_dir": str(out), "seed": seed, "micro_batch_size": size.micro_batch,
        "grad_accum": 1, "max_steps": steps, "data": data,
        "optim": {"lr": size.lr, "warmup_ratio": settings.warmup_ratio, "lr_scale": dict(settings.lr_scale)},
        # stages 1-2 draw N from the sweep per micro-batch (one fusion for every N); stage 3 fixes it
        "n_queries_choices": [] if "n_queries" in extra else list(size.n_values),
        # deterministic kernels: a rerun gives the same bits even when other processes share the CPU (without them
        # two runs drifted apart within a few steps under load)
        "engine": {"device": "cpu", "deterministic": True},
        "checkpoint": {"every": 0, "keep_last": 1},
        "logging": {"wandb_mode": "disabled", "progress_bar": True},
        **extra,
    }
    train_cfg = from_dict(TrainConfig, cfg)
    train_cfg.validate()
    return train_cfg


def run_stage(stage: str, out: Path, data_dir: Path, size, steps: int, seed: int, **extra) -> Path:
    """Run one stage through the training entry point unless ``out/final`` exists; returns ``out/final``."""
    from fusion_vlm.training.loop import train

    final = out / "final"
    if (final / "model.safetensors").is_file():
        print(f"[demo] {out.name}: done earlier, skipped")
        return final
    train(stage_train_config(stage, out, data_dir, size, steps, seed, **extra))
    return final
