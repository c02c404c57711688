"""The demo's recipe as configuration: ``configs/demo/quick.yaml`` and ``configs/demo/full.yaml``.

A :class:`DemoConfig` holds everything a demo run depends on: the world, the
sizes of the splits, the stage-0 preset, the model overrides, every training
stage's steps and learning-rate set-up, the N sweep, the evaluation and the
report's bootstrap. :func:`load_demo_config` reads a preset name or a YAML path
plus ``key=value`` overrides (``stage1.steps=50``, ``world.questions=[4,6]``,
``n_values=[1,8]``) and validates the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from fusion_vlm.config import resolve_preset
from fusion_vlm.demo.world import FAMILIES, WorldConfig
from fusion_vlm.schema import ConfigError, load_config, require


@dataclass
class StageConfig:
    """One training stage of the demo (stages 1-3 run through :func:`fusion_vlm.training.loop.train`)."""

    steps: int = 100  # optimiser steps (stage 3: per N and variant)
    warmup_ratio: float = 0.03  # linear warm-up over this fraction of the steps, then cosine to 0
    lr_scale: dict[str, float] = field(default_factory=dict)  # lr multiplier per parameter-name prefix (vision, ...)
    fraction: float = 1.0  # seeded subset of the train split this stage trains on (the paper's stage 3: 0.1)


@dataclass
class EvalSettings:
    """How the test split is asked and how the report's intervals are drawn."""

    batch_images: int = 16  # test images per generate() call (each with all its questions)
    max_new_tokens: int = 48  # longest generated description
    short_new_tokens: int = 8  # longest generated answer of every other family (one-word answers)
    n_boot: int = 2000  # bootstrap replicates of every 95 % interval of the report (over test images)
    small_n: int = 4  # "small N" of the question-fusion verdict: N <= this


@dataclass
class DemoConfig:
    """A whole demo run; ``configs/demo/*.yaml`` are instances."""

    name: str = "custom"  # label of the run in the report
    seed: int = 0  # seed of the world, stage 0, stages 1-3 and evaluation (world.seed follows it)
    train_images: int = 2000  # images in the train split (each with the world's questions)
    test_images: int = 144  # images in the test split
    standins: str = "shipped"  # shipped: the stand-ins inside the package (fusion-vlm standins make; used when the
    #                            world is theirs, else trained in the run) | retrain: train them in the run (stage0)
    stage0: str = "full"  # preset of the stand-ins trained in the run, a name of fusion_vlm.demo.stage0.PRESETS
    n_values: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # the N sweep (stage 3 and evaluation); N' = min(N, 8)
    micro_batch: int = 8  # images per training step (stages 1-3)
    lr: float = 1e-3  # peak learning rate of stages 1-3 (times each stage's lr_scale)
    model_overrides: list[str] = field(default_factory=list)  # section.field=value on the tiny model preset
    world: WorldConfig = field(default_factory=WorldConfig)  # the synthetic world (fusion_vlm.demo.world)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(warmup_ratio=0.1))  # contrastive, N drawn per step
    stage2: StageConfig = field(default_factory=StageConfig)  # generation, N drawn per step
    stage3: StageConfig = field(default_factory=StageConfig)  # generation fine-tune at each fixed N (vqq and vq_ft)
    baselines: StageConfig = field(default_factory=StageConfig)  # projector training of each baseline (steps 0: none)
    eval: EvalSettings = field(default_factory=EvalSettings)  # test-time settings and the report's bootstrap

    def __post_init__(self):
        if self.world.seed not in (0, self.seed):
            raise ConfigError(f"world.seed={self.world.seed}: the world's seed is the top-level seed; set seed instead")
        self.world = replace(self.world, seed=self.seed)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        require(self.train_images >= 1, "train_images", self.train_images, "must be >= 1")
        require(self.test_images >= 2, "test_images", self.test_images, "must be >= 2 (intervals need two images)")
        require(len(self.n_values) >= 1 and all(n >= 1 for n in self.n_values), "n_values", self.n_values,
                "must be one or more N >= 1")
        require(len(set(self.n_values)) == len(self.n_values), "n_values", self.n_values, "must not repeat an N")
        require(self.standins in ("shipped", "retrain"), "standins", self.standins, "must be shipped or retrain")
        require(self.micro_batch >= 1, "micro_batch", self.micro_batch, "must be >= 1")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.baselines.steps >= 0, "baselines.steps", self.baselines.steps, "must be >= 0 (0: no baselines)")
        for name in ("stage1", "stage2", "stage3", "baselines"):
            s = getattr(self, name)
            require(s.steps >= 1 or name == "baselines", f"{name}.steps", s.steps, "must be >= 1")
            require(0 <= s.warmup_ratio < 1, f"{name}.warmup_ratio", s.warmup_ratio, "must be in [0, 1)")
            require(0 < s.fraction <= 1, f"{name}.fraction", s.fraction, "must be in (0, 1]")
            require(all(v > 0 for v in s.lr_scale.values()), f"{name}.lr_scale", s.lr_scale, "every scale must be > 0")
        require(all("=" in o for o in self.model_overrides), "model_overrides", self.model_overrides,
                "every entry must be section.field=value")
        w = self.world
        require(set(w.families) <= set(FAMILIES), "world.families", w.families, f"must be among {FAMILIES}")
        require(1 <= w.n_shapes[0] <= w.n_shapes[1], "world.n_shapes", w.n_shapes, "must be 1 <= low <= high")
        require(0 <= w.n_glyphs[0] <= w.n_glyphs[1], "world.n_glyphs", w.n_glyphs, "must be 0 <= low <= high")
        require(3 <= w.grid <= 6, "world.grid", w.grid, "must be 3..6 cells per side")
        require(w.n_shapes[1] + w.n_glyphs[1] <= w.grid ** 2, "world.n_shapes/n_glyphs", (w.n_shapes, w.n_glyphs),
                f"at most {w.grid ** 2} items fit the {w.grid}x{w.grid} layout (world.grid)")
        require(w.skew is None or w.skew > 0, "world.skew", w.skew, "must be > 0 or null")
        require(1 <= w.questions[0] <= w.questions[1], "world.questions", w.questions, "must be 1 <= low <= high")
        require(all(c in w.colours and s in w.shapes for c, s in w.heldout), "world.heldout", w.heldout,
                "every held-out pair must use the world's colours and shapes")
        e = self.eval
        require(e.batch_images >= 1, "eval.batch_images", e.batch_images, "must be >= 1")
        require(e.max_new_tokens >= 1, "eval.max_new_tokens", e.max_new_tokens, "must be >= 1")
        require(e.short_new_tokens >= 1, "eval.short_new_tokens", e.short_new_tokens, "must be >= 1")
        require(e.n_boot >= 100, "eval.n_boot", e.n_boot, "must be >= 100")
        require(e.small_n >= 1, "eval.small_n", e.small_n, "must be >= 1")
        try:
            from fusion_vlm.demo.stage0 import PRESETS
        except ImportError:  # stage 0 reports an unknown preset itself when it runs
            return
        require(self.stage0 in PRESETS, "stage0", self.stage0, f"must be one of {sorted(PRESETS)}")

    def stage_for(self, kind: str) -> StageConfig:
        """The settings a training stage of ``kind`` (contrastive | generation | baselines) uses by default:
        stage 1, stage 2 or the baselines' section."""
        return {"contrastive": self.stage1, "baselines": self.baselines}.get(kind, self.stage2)


def resolve_demo_config(name_or_path: str | Path) -> Path:
    """Map a demo preset name (``quick``, ``full``) or a path to an existing YAML file."""
    return resolve_preset("demo", name_or_path)


def load_demo_config(name_or_path: str | Path = "full", overrides: list[str] | None = None) -> DemoConfig:
    """Load a :class:`DemoConfig` from a preset name or YAML path plus ``key=value`` overrides; validated."""
    return load_config(DemoConfig, resolve_demo_config(name_or_path), overrides)
