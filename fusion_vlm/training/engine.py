"""DeepSpeed setup: process group, DeepSpeed JSON, optimizer on trainable parameters, LR schedule.

The same path serves GPUs (NCCL, bf16, DeepSpeed's fused AdamW) and the CPU
(gloo, fp32, ``DS_ACCELERATOR=cpu``). On the CPU DeepSpeed's own Adam needs a
C++ JIT build (minutes, needs a compiler), so by default a plain
``torch.optim.AdamW`` is handed to ``deepspeed.initialize`` there; ZeRO still
wraps it. Only the parameters returned by ``model.set_stage`` reach the
optimizer, so the frozen LLM carries no optimizer state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fusion_vlm.errors import ConfigError, MissingFileError
from fusion_vlm.training.config import TrainConfig, resolve_repo_path


def pick_device(device: str) -> str:
    """``auto`` -> cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device=cuda but no CUDA GPU is visible")
    return device


def setup_distributed(device: str, backend: str | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (world size 1 when not launched); returns (rank, world, local_rank).

    Must run before anything asks DeepSpeed for its accelerator: on the CPU it
    sets ``DS_ACCELERATOR=cpu``. A process not started by a launcher (plain
    ``python train.py``, or training in-process) is a world of one whose ranks
    meet in an in-memory ``HashStore``: no TCP port is picked, so two such runs
    started at once cannot race for one.
    """
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # DeepSpeed reads these (and tries MPI discovery without them)
            for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", RANK="0", WORLD_SIZE="1",
                                   LOCAL_RANK="0").items():
                os.environ.setdefault(key, value)
        if os.environ.get("WORLD_SIZE", "1") == "1":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)  # adopts a group already initialised
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


@contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """Within the block, ``torch.use_deterministic_algorithms(on)`` without filling new tensors with NaN
    (``torch.utils.deterministic.fill_uninitialized_memory``, on by default with it, slowed the CPU demo's
    training 2.6x); both settings are restored after.

    On a GPU, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for deterministic matmuls; it is set to ``:4096:8``
    when unset (before the first cuBLAS call of the process). ``on=False`` leaves everything as it is.
    """
    if not on:
        yield
        return
    import torch.utils.deterministic as det

    before, fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        det.fill_uninitialized_memory = fill


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warm-up, then cosine (or constant)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig, world: int, device: str, torch_optimizer: bool) -> dict:
    """The DeepSpeed JSON for this run: the base file with batch sizes, ZeRO stage, precision and optimizer set."""
    path = resolve_repo_path(cfg.engine.deepspeed_config)
    if not path.is_file():
        raise MissingFileError(f"engine.deepspeed_config '{cfg.engine.deepspeed_config}' does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.deepspeed_config '{path}': invalid JSON ({err})") from None
    ds.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum,
              train_batch_size=cfg.micro_batch_size * cfg.grad_accum * world, gradient_clipping=cfg.optim.grad_clip,
              steps_per_print=10**9, wall_clock_breakdown=False)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.engine.zero_stage is not None:
        zero["stage"] = cfg.engine.zero_stage
    precision = cfg.engine.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds.pop("scheduler", None)  # the schedule is ours (lr_factor), stepped by DeepSpeed on applied steps only
    if torch_optimizer:
        ds.pop("optimizer", None)
    else:
        o = cfg.optim
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                       "weight_decay": o.weight_decay}}
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], lr: float,
                 lr_scale: dict[str, float]) -> list[dict]:
    """Split ``params`` into optimizer groups by ``lr_scale`` (parameter-name prefix -> lr multiplier).

    Each parameter takes the scale of the longest prefix of its name in ``lr_scale`` (1 if none);
    returns [{"params", "lr"}], the group of scale 1 first. A prefix that matches no
    trained parameter is an error (a typo would otherwise train at the base lr silently).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    unused = set(lr_scale)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in params:
        name = names.get(id(p), "")
        hits = [k for k in lr_scale if name == k or name.startswith(k.rstrip(".") + ".")]
        key = max(hits, key=len) if hits else None
        unused.discard(key)
        groups.setdefault(1.0 if key is None else float(lr_scale[key]), []).append(p)
    if unused:
        raise ConfigError(f"optim.lr_scale: prefix(es) {sorted(unused)} match no trained parameter")
    order = sorted(groups, key=lambda s: (s != 1.0, s))
    return [{"params": groups[s], "lr": lr * s} for s in order]


def build_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: TrainConfig, total_steps: int,
                 world: int, device: str):
    """``deepspeed.initialize`` on ``model`` with only ``params`` in the optimizer; returns the engine."""
    import deepspeed

    use_torch_opt = cfg.engine.torch_optimizer
    if use_torch_opt is None:
        use_torch_opt = device == "cpu"
    ds_config = deepspeed_config(cfg, world, device, use_torch_opt)
    o = cfg.optim
    groups = param_groups(model, params, o.lr, o.lr_scale)
    optimizer = None
    if use_torch_opt:
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total_steps, o.warmup_ratio, o.schedule, o.min_lr_ratio))

    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:  # DeepSpeed broadcasts parameters as p.data.view(torch.uint8), which fails for 0-dim tensors
        raise ValueError(f"0-dim parameters cannot be trained with DeepSpeed (give them shape [1]): {scalars}")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    if engine.zero_optimization_stage() == 3:
        # Some trained weights are used outside their own module's forward (e.g. embedding tables read by a
        # parent); ZeRO-3 would not re-gather them for backward. Registering the trained parameters with the
        # root module keeps them gathered from its forward to its backward (~2 bytes per trained parameter);
        # the frozen LLM stays partitioned.
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for p in params:
            register_external_parameter(model, p)
    return engine


def optimizer_param_ids(engine) -> set[int]:
    """ids of the model parameters the (ZeRO) optimizer updates (for checking the frozen LLM is absent)."""
    opt = engine.optimizer
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "fp16_groups", None)
    if groups is None:
        groups = [g["params"] for g in opt.param_groups]
    return {id(p) for group in groups for p in group}


def current_lr(engine) -> float:
    """Learning rate of the first parameter group."""
    return float(engine.get_lr()[0])
