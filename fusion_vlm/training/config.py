"""Typed training configuration (one :class:`TrainConfig` for all three paper stages).

``configs/train/*.yaml`` are instances of :class:`TrainConfig`, loaded with the
repo's schema utilities (:func:`fusion_vlm.schema.load_config`), so unknown keys
and wrong types fail at load time with a message naming the field, and every
field is a ``fusion-vlm train`` flag (``--section.field VALUE``, generated from this schema).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fusion_vlm.config import CONFIG_DIR, STAGES, resolve_preset
from fusion_vlm.schema import ConfigError, load_config
from fusion_vlm.schema import require as _require


@dataclass
class DataConfig:
    """LLaVA-format conversation files (see :mod:`fusion_vlm.training.data`)."""

    files: list[str] = field(default_factory=list)  # JSON list or JSONL files of {id, image, conversations}
    image_root: str | None = None  # directory the records' relative `image` paths are resolved against
    # accept `image` paths that leave image_root (absolute, `..`, symlinks pointing out); false = such records are
    # skipped as outside_image_root (no effect when image_root is null)
    allow_outside_image_root: bool = False
    fraction: float = 1.0  # keep this seeded random fraction of the records (0.1 = the paper's stage-3 subset)
    fraction_seed: int = 0  # seed of the subset draw (same seed -> same subset for every N in a sweep)
    max_questions: int | None = None  # keep at most this many question/answer pairs per sample; null = all
    independent_questions: bool = False  # ask each question on its own: one LLM row and N slots per question, as
    # benchmarks ask (all questions of an image from one vision pass); false = one conversation, N then N' slots
    shuffle: bool = True  # reshuffle the records every epoch (seeded by train.seed + epoch)
    num_workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    max_skip_fraction: float = 0.5  # abort when more than this fraction of the samples seen was skipped
    min_seen_for_abort: int = 20  # ...but only once this many samples were seen (avoids aborting on 1 of 1)
    log_first_skips: int = 5  # print the first this-many skipped samples with their id and reason


@dataclass
class OptimConfig:
    """AdamW on the trainable parameters only, cosine schedule with linear warm-up."""

    lr: float = 2e-5  # peak learning rate (paper: 2e-5 in every stage)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    warmup_ratio: float = 0.03  # fraction of the optimizer steps spent in linear warm-up (0.1 in stage 1)
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    # lr multiplier per parameter-name prefix, e.g. {fusion: 0.3}; the longest matching prefix wins, others get 1
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineConfig:
    """DeepSpeed engine settings (see :mod:`fusion_vlm.training.engine`)."""

    deepspeed_config: str = "configs/deepspeed/zero2.json"  # base DeepSpeed JSON (relative paths: repo root first)
    zero_stage: int | None = None  # override the JSON's ZeRO stage (0-3); null = keep it
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cuda | cpu
    dist_backend: str | None = None  # torch.distributed backend; null = nccl on GPU, gloo on CPU
    torch_optimizer: bool | None = None  # pass a torch.optim.AdamW to DeepSpeed; null = on CPU only (its fused CPU Adam needs a C++ build)
    # torch.use_deterministic_algorithms(True) for the run (and CUBLAS_WORKSPACE_CONFIG on a GPU): reruns give the
    # same bits even when other processes share the CPU; some GPU kernels are slower; false = torch's default kernels
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    """Atomic checkpoints every K steps and at the end (see :mod:`fusion_vlm.training.checkpoint`)."""

    every: int = 500  # save every this many optimizer steps (0 = only at the end)
    keep_last: int = 3  # keep only the newest this-many step checkpoints
    resume: str = "auto"  # auto (resume if output_dir holds a checkpoint) | never | a checkpoint directory
    save_on_signal: bool = True  # SIGTERM/SIGINT: save a checkpoint, then exit
    # record every checkpoint file's sha256 in its manifest.json and check it before resuming (reads each
    # checkpoint once more at save and at resume); false = sizes plus the CRC-32s of DeepSpeed's archives only
    sha256: bool = True


@dataclass
class LoggingConfig:
    """Progress bar, JSONL metrics (always) and optional wandb."""

    every: int = 1  # write metrics every this many optimizer steps
    progress_bar: bool = True  # tqdm bar with step, losses, lr, samples/s, tokens/s and ETA
    # disabled (default: wandb is never imported) | offline (local files under OUTPUT/wandb, no network; upload
    # later with `wandb sync`) | online (streams to the wandb server)
    wandb_mode: str = "disabled"
    wandb_project: str = "fusion-vlm"  # wandb project name
    run_name: str | None = None  # wandb run name; null = the output directory's name


@dataclass
class TrainConfig:
    """One training run: a stage, a model, data, optimisation, engine, checkpoints and logging."""

    stage: str = "generation"  # contrastive (paper stage 1) | generation (stages 2 and 3)
    model: str = "tiny"  # model preset name (tiny, paper) or model YAML; ignored when init_from is set
    model_overrides: list[str] = field(default_factory=list)  # `section.field=value` strings for the model config
    init_from: str | None = None  # FusionVLM.from_pretrained directory to start from (stage 3: the stage-2 output)
    n_queries: int | None = None  # N for this run (stage-3 sweep); null = the model config's
    n_queries_later: int | None = None  # N' for this run; null = min(N, 8) when n_queries is set, else the model config's
    # draw N per micro-batch from these values (one fusion for every N of a sweep; N' = min(N, fusion.later));
    # the draw is seeded by (seed, epoch, micro-batch), the same on every rank; empty = n_queries for every batch
    n_queries_choices: list[int] = field(default_factory=list)
    use_question: bool | None = None  # fuse the question tokens; null = the model config's
    grad_checkpointing: bool | None = None  # set vision/fusion/llm grad_checkpointing together; null = the model config's
    output_dir: str = "runs/train"  # checkpoints, metrics.jsonl, final model
    seed: int = 0  # seeds torch, numpy, random and the data order
    micro_batch_size: int = 1  # samples per device per forward pass (paper: 32 / 5 / 5)
    grad_accum: int = 1  # micro-batches per optimizer step (paper: 1 / 64 / 64)
    max_steps: int | None = None  # optimizer steps; null = run `epochs` passes over the data
    epochs: float = 1.0  # passes over the (subset of the) data when max_steps is null
    # abort after this many consecutive NaN/Inf steps (each is skipped), or after more than half of max_steps in a
    # row for shorter runs; a run that ends with more than half of its steps skipped is not exported either
    max_nonfinite_in_a_row: int = 10
    stop_at_step: int | None = None  # save and exit after this step as if interrupted (schedule still for max_steps)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        _require(self.stage in STAGES, "stage", self.stage, f"must be one of {', '.join(STAGES)}")
        _require(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1")
        _require(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        _require(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        _require(self.n_queries is None or self.n_queries >= 1, "n_queries", self.n_queries, "must be >= 1")
        _require(self.n_queries_later is None or self.n_queries_later >= 1, "n_queries_later",
                 self.n_queries_later, "must be >= 1")
        for n in self.n_queries_choices:
            _require(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "n_queries_choices", n,
                     "every value must be an integer >= 1")
        _require(not (self.n_queries_choices and self.n_queries_later is not None), "n_queries_later",
                 self.n_queries_later, "must be null when n_queries_choices is set (N' = min(N, fusion.later))")
        _require(self.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", self.max_nonfinite_in_a_row,
                 "must be >= 1")
        d, o, e, c, lg = self.data, self.optim, self.engine, self.checkpoint, self.logging
        _require(0 < d.fraction <= 1, "data.fraction", d.fraction, "must be in (0, 1]")
        _require(d.max_questions is None or d.max_questions >= 1, "data.max_questions", d.max_questions,
                 "must be >= 1")
        _require(0 <= d.max_skip_fraction <= 1, "data.max_skip_fraction", d.max_skip_fraction, "must be in [0, 1]")
        _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
        _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
        _require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
        _require(o.schedule in ("cosine", "constant"), "optim.schedule", o.schedule, "must be cosine or constant")
        for prefix, scale in o.lr_scale.items():
            _require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0,
                     f"optim.lr_scale.{prefix}", scale, "must be a number > 0")
        _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0")
        _require(e.zero_stage is None or e.zero_stage in (0, 1, 2, 3), "engine.zero_stage", e.zero_stage,
                 "must be 0, 1, 2 or 3")
        _require(e.precision in ("auto", "bf16", "fp32"), "engine.precision", e.precision,
                 "must be auto, bf16 or fp32")
        _require(e.device in ("auto", "cuda", "cpu"), "engine.device", e.device, "must be auto, cuda or cpu")
        _require(c.every >= 0, "checkpoint.every", c.every, "must be >= 0")
        _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
        _require(lg.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode", lg.wandb_mode,
                 "must be offline, online or disabled")
        _require(lg.every >= 1, "logging.every", lg.every, "must be >= 1")

    def model_overrides_all(self) -> list[str]:
        """``model_overrides`` plus the N / N' / use_question shortcuts as model-config overrides."""
        out = list(self.model_overrides)
        if self.n_queries is not None:
            out.append(f"fusion.n_queries={self.n_queries}")
            if self.n_queries_later is None:  # keep the paper's rule N' = min(N, 8) unless given
                out.append("fusion.n_queries_later=null")
        if self.n_queries_later is not None:
            out.append(f"fusion.n_queries_later={self.n_queries_later}")
        if self.use_question is not None:
            out.append(f"fusion.use_question={str(self.use_question).lower()}")
        if self.grad_checkpointing is not None:
            flag = str(self.grad_checkpointing).lower()
            out += [f"vision.grad_checkpointing={flag}", f"fusion.grad_checkpointing={flag}",
                    f"llm.grad_checkpointing={flag}"]
        return out



def resolve_train_config(name_or_path: str | Path) -> Path:
    """Map a preset name (``stage1_contrastive``, ``tiny_stage2``...) or a path to a YAML file."""
    return resolve_preset("train", name_or_path)


def load_train_config(name_or_path: str | Path | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Load a :class:`TrainConfig` from a YAML preset/path plus ``key=value`` (or ``{key: value}``) overrides."""
    path = resolve_train_config(name_or_path) if name_or_path is not None else None
    return load_config(TrainConfig, path, overrides)


def resolve_repo_path(path: str | Path) -> Path:
    """A relative path that exists under the current directory, else one of the shipped configs
    (``configs/deepspeed/zero2.json`` is found inside the installed package too)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    parts = p.parts
    return CONFIG_DIR.joinpath(*parts[1:]) if parts and parts[0] == "configs" else CONFIG_DIR.parent / p
