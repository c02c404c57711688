"""The one training loop for all three paper stages.

Stage 1 is ``stage: contrastive``; stages 2 and 3 are ``stage: generation``
(stage 3 starts from a stage-2 checkpoint via ``init_from`` with its own N, N'
and use_question). :func:`train` builds the model, the data and the DeepSpeed
engine, resumes when asked, and runs optimizer steps of ``grad_accum``
micro-batches until ``max_steps`` (or ``epochs``) are done, saving atomic
checkpoints on the way, on SIGTERM/SIGINT and at the end, and exporting the
final model with ``save_pretrained`` (safetensors) to ``OUTPUT/final``.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from fusion_vlm.errors import CheckpointError, ConfigError, MissingFileError
from fusion_vlm.schema import to_dict
from fusion_vlm.training import checkpoint as ckpt
from fusion_vlm.training.batches import Collator, ResumableBatchSampler, SampleDataset
from fusion_vlm.training.config import TrainConfig
from fusion_vlm.training.data import SkipCounter, load_llava
from fusion_vlm.training.engine import (build_engine, current_lr, deterministic_algorithms, optimizer_param_ids,
                                        pick_device, setup_distributed)
from fusion_vlm.training.metrics import MetricsLogger
from fusion_vlm.training.state import StepTotals, TrainerState


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/Inf loss or gradient."""


@dataclass
class TrainResult:
    """What a run did (rank-0 view)."""

    steps: int  # optimizer steps done (including resumed ones)
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss, for the steps run in this process
    skips: dict = field(default_factory=dict)  # SkipCounter.summary() over all ranks
    nonfinite_steps: int = 0  # steps skipped for a NaN/Inf loss or gradient (including resumed ones)
    applied_steps: int = 0  # optimizer steps that updated the weights (steps - nonfinite_steps)
    stopped: str | None = None  # "signal" / "stop_at_step" when the run stopped early
    final_dir: Path | None = None  # save_pretrained export (only when the run finished)
    checkpoint: Path | None = None  # last checkpoint written
    optimizer_params: list[str] = field(default_factory=list)  # names of the parameters the optimizer updates
    optimizer_state_numel: int = 0  # elements of optimizer state (exp_avg, exp_avg_sq...) on this rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, device: str):
    """The model for this run: from ``init_from`` (stages 2-3) or from the model config.

    The generation stage always builds the LLM (``llm.load=true``), also from a stage-1
    export made without it; the contrastive stage follows the config (``llm.load: false``
    in the stage-1 configs, since stage 1 never runs the LLM).
    """
    from fusion_vlm.model import FusionVLM

    overrides = cfg.model_overrides_all() + (["llm.load=true"] if cfg.stage == "generation" else [])
    if cfg.init_from:
        if (Path(cfg.init_from) / ckpt.STATE_FILE).is_file():
            raise ValueError(f"init_from='{cfg.init_from}' is a training checkpoint (for --resume); start a new "
                             f"stage from the run's save_pretrained export, e.g. {Path(cfg.init_from).parent}/final")
        return FusionVLM.from_pretrained(cfg.init_from, overrides=overrides, device=device)
    return FusionVLM.from_config(cfg.model, overrides=overrides, device=device)


def _resume_point(cfg: TrainConfig, out: Path, rank: int) -> Path | None:
    """The verified checkpoint to resume from (:func:`checkpoint.find_resume`), chosen on rank 0 and shared
    with every rank, so each checkpoint file is read once; its errors are raised on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ckpt.find_resume(cfg.checkpoint.resume, out)
    box: list = [None]
    if rank == 0:
        try:
            found = ckpt.find_resume(cfg.checkpoint.resume, out)
            box[0] = ("ok", None if found is None else str(found))
        except MissingFileError as err:
            box[0] = ("missing", str(err))
        except CheckpointError as err:
            box[0] = ("damaged", str(err))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "missing":
        raise MissingFileError(value)
    if kind == "damaged":
        raise CheckpointError(value)
    return None if value is None else Path(value)


def _all_reduce(values: list[float], op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to("cuda") if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.cpu().tolist()


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self, enabled: bool):
        self.hit = False
        self.old = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self.old[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread (e.g. some test runners): no handler
                    pass

    def _handler(self, signum, frame):
        self.hit = True
        print(f"[train] received signal {signum}: saving a checkpoint at the end of this step", file=sys.stderr)

    def restore(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def _zero_loss(params) -> torch.Tensor:
    """A loss with zero gradient for every trainable parameter (micro-batch whose samples were all skipped)."""
    return sum((p * 0).sum() for p in params)


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training stage described by ``cfg``; returns a :class:`TrainResult`.

    With ``engine.deterministic`` the run uses torch's deterministic algorithms
    (:func:`~fusion_vlm.training.engine.deterministic_algorithms`).
    """
    with deterministic_algorithms(cfg.engine.deterministic):
        return _train(cfg)


def _train(cfg: TrainConfig) -> TrainResult:
    device = pick_device(cfg.engine.device)
    rank, world, local_rank = setup_distributed(device, cfg.engine.dist_backend)
    out = Path(cfg.output_dir)
    resume_from = _resume_point(cfg, out, rank)  # verified before any work
    seed_everything(cfg.seed)
    model = build_model(cfg, "cuda" if device == "cuda" else "cpu")
    params = model.set_stage(cfg.stage)
    too_many = [n for n in cfg.n_queries_choices if n > model.config.fusion.max_queries]
    if too_many:
        raise ConfigError(f"n_queries_choices={cfg.n_queries_choices}: {too_many} exceed fusion.max_queries="
                         f"{model.config.fusion.max_queries} (raise it with model_overrides)")

    counter = SkipCounter(cfg.data.max_skip_fraction, cfg.data.min_seen_for_abort,
                          cfg.data.log_first_skips if rank == 0 else 0)
    records = load_llava(cfg.data.files, cfg.data.image_root, counter, cfg.data.fraction, cfg.data.fraction_seed,
                         cfg.data.max_questions, allow_outside_root=cfg.data.allow_outside_image_root)
    dataset = SampleDataset(records, model.processor, cfg.stage, independent=cfg.data.independent_questions)
    per_epoch = ResumableBatchSampler.batches_per_epoch(len(dataset), cfg.micro_batch_size, world)
    steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    engine = build_engine(model, params, cfg, total_steps, world, device)
    state = TrainerState()
    if resume_from is not None:
        trainer_state, rank_state = ckpt.load_checkpoint(engine, resume_from, rank)
        state = TrainerState.from_dict(trainer_state, f"{resume_from / ckpt.STATE_FILE}")
        counter.load_state(rank_state["skips"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    logger = MetricsLogger(out, cfg.logging, total_steps, state.step, rank, to_dict(cfg))
    if resume_from is not None:
        logger.event("resume", checkpoint=str(resume_from), step=state.step)
    stop = _StopFlag(cfg.checkpoint.save_on_signal)
    result = TrainResult(steps=state.step)

    def save() -> Path:
        path = ckpt.save_checkpoint(engine, out, state.step, state.to_dict(total_steps, cfg.stage),
                                    {"skips": counter.state()}, cfg.checkpoint.keep_last, rank,
                                    with_sha256=cfg.checkpoint.sha256)
        logger.event("checkpoint", step=state.step, path=str(path))
        result.checkpoint = path
        return path

    totals = StepTotals()
    micro = 0
    # consecutive skipped steps that stop the run: max_nonfinite_in_a_row, or more than half of a short run
    nonfinite_limit = min(cfg.max_nonfinite_in_a_row, total_steps // 2 + 1)
    engine.train()
    try:
        while state.step < total_steps and result.stopped is None:
            sampler = ResumableBatchSampler(len(dataset), cfg.micro_batch_size, cfg.seed, state.epoch,
                                            state.batch_in_epoch, cfg.data.shuffle, rank, world,
                                            cfg.n_queries_choices)
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(model.tokenizer.pad_token_id),
                                num_workers=cfg.data.num_workers)
            for mb in loader:
                state.batch_in_epoch += 1
                for s in mb.skipped:
                    counter.skip(s.reason, s.id, s.message, key=s.key)
                    counter.attempt(False)
                for _ in range(mb.n_samples):
                    counter.attempt(True)
                if micro % cfg.grad_accum == 0:
                    totals.lr = current_lr(engine)  # the lr this optimizer step uses
                if mb.batch is None:
                    loss, named = _zero_loss(params), {}
                else:
                    named = engine(mb.batch, cfg.stage)
                    loss = named["loss"]
                    if cfg.n_queries_choices:  # logged as the step's mean N
                        named = {**named, "n_queries": torch.tensor(float(mb.batch.n_queries))}
                if not torch.isfinite(loss.detach()).all():  # DeepSpeed skips the step on the NaN/Inf gradient
                    print(f"[train] non-finite loss {float(loss.detach()):.3g} at step {state.step + 1}",
                          file=sys.stderr)
                engine.backward(loss)
                engine.step()
                totals.add(loss, named, mb.batch is not None, mb.n_samples, mb.n_tokens)
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                state.step += 1
                _finish_step(engine, state, totals, logger, nonfinite_limit, result, counter)
                totals = StepTotals()
                if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                    save()
                stop_now = _all_reduce([float(stop.hit)], dist.ReduceOp.MAX)[0] > 0
                if stop_now or (cfg.stop_at_step is not None and state.step >= cfg.stop_at_step):
                    result.stopped = "signal" if stop_now else "stop_at_step"
                    break
                if state.step >= total_steps:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
        applied = state.applied_steps
        if result.stopped is None and (applied == 0 or 2 * state.nonfinite_steps > state.step):
            raise NonFiniteLossError(f"{state.nonfinite_steps} of {state.step} optimizer steps had a NaN/Inf loss "
                                     f"or gradient and were skipped ({applied} applied): the run diverged (is optim.lr="
                                     f"{cfg.optim.lr} too high?); not exporting {out / 'final'}")
        if result.checkpoint is None or result.checkpoint.name != f"{ckpt.PREFIX}{state.step:07d}":
            save()
        result.steps = state.step
        result.nonfinite_steps = state.nonfinite_steps
        result.applied_steps = applied
        result.skips = _gather_skips(counter)
        held = optimizer_param_ids(engine)
        result.optimizer_params = [n for n, p in model.named_parameters() if id(p) in held]
        result.optimizer_state_numel = _optimizer_state_numel(engine)
        if result.stopped is None:
            result.final_dir = _export(model, engine, out / "final", rank)
        logger.event("end", step=state.step, stopped=result.stopped, skips=result.skips,
                     nonfinite_steps=state.nonfinite_steps)
        if rank == 0:
            (out / "train_summary.json").write_text(json.dumps(
                {"steps": result.steps, "stopped": result.stopped, "skips": result.skips,
                 "nonfinite_steps": result.nonfinite_steps, "applied_steps": applied,
                 "final": str(result.final_dir)}, indent=2))
            _print_skips(result.skips)
            if state.nonfinite_steps:
                print(f"[train] {state.nonfinite_steps} of {state.step} optimizer steps were skipped (NaN/Inf "
                      f"loss or gradient; see skipped_step in metrics.jsonl)", file=sys.stderr)
    finally:
        stop.restore()
        logger.close()
        engine.destroy()  # its hooks keep the model and optimizer alive: every later run in this process would leak them
    return result


def _finish_step(engine, state: TrainerState, totals: StepTotals, logger: MetricsLogger, nonfinite_limit: int,
                 result: TrainResult, counter: SkipCounter) -> None:
    """After an optimizer step: skip ceiling, NaN bookkeeping, cross-rank means, metrics (same on every rank).

    ``nonfinite_limit`` consecutive skipped (NaN/Inf) steps raise :class:`NonFiniteLossError`.
    """
    applied = engine.was_step_applied()
    loss_sum, n, samples, tokens, bad, attempts, failed = _all_reduce(
        [totals.loss, totals.n, totals.samples, totals.tokens, float(not applied), counter.attempts,
         counter.failed_attempts])
    counter.check(attempts=int(attempts), failed=int(failed))
    state.record_step(applied=bad == 0)
    step = state.step
    loss = loss_sum / n if n else float("nan")
    terms = totals.terms
    term_vals = _all_reduce(list(terms.values())) if terms else []
    sps, tps = logger.throughput(int(samples), int(tokens))
    metrics = {"loss": loss, **{k: v / n for k, v in zip(terms, term_vals) if n},
               "lr": totals.lr if totals.lr is not None else current_lr(engine), "grad_norm": _grad_norm(engine),
               "samples": int(samples), "tokens": int(tokens), "samples_per_s": sps, "tokens_per_s": tps,
               "epoch": state.epoch, "skipped_step": bool(bad > 0), "skipped_steps": state.nonfinite_steps,
               "eta_s": logger.eta_s(step)}
    result.losses[step] = loss
    logger.log(step, metrics)
    if state.nonfinite_in_a_row >= nonfinite_limit:  # after logging: the last skipped step shows too
        raise NonFiniteLossError(f"{state.nonfinite_in_a_row} optimizer steps in a row had a NaN/Inf loss or "
                                 f"gradient and were skipped (limit {nonfinite_limit}: max_nonfinite_in_a_row, or "
                                 f"half the run + 1); stopping at step {step}, nothing exported")


def _optimizer_state_numel(engine) -> int:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(v.numel() for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def _gather_skips(counter: SkipCounter) -> dict:
    """Skip counts over all ranks (each rank built different samples)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, counter.state())
        for r, s in enumerate(states):
            if r != dist.get_rank():
                counter.merge(s)
    return counter.summary()


def _nonfinite_params(model) -> list[str]:
    """Names of the parameters holding a NaN or Inf (every rank sees the same full weights here)."""
    return [n for n, p in model.named_parameters() if p.numel() and not torch.isfinite(p.detach()).all()]


def _export(model, engine, directory: Path, rank: int) -> Path:
    """Write the trained model with ``save_pretrained`` (ZeRO-3: gather the partitioned weights first).

    Refuses (:class:`NonFiniteLossError`, on every rank) when a weight is NaN/Inf.
    """
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            bad = _nonfinite_params(model)
            if not bad and rank == 0:
                model.save_pretrained(directory)
    else:
        bad = _nonfinite_params(model)
        if not bad and rank == 0:
            model.save_pretrained(directory)
    if _all_reduce([float(len(bad))], dist.ReduceOp.MAX)[0] > 0:
        raise NonFiniteLossError(f"{len(bad)} parameters hold NaN/Inf values (first: {bad[0] if bad else '?'}); "
                                 f"not exporting {directory}")
    if dist.is_initialized():
        dist.barrier()
    return directory


def _print_skips(skips: dict) -> None:
    by = ", ".join(f"{k}={v}" for k, v in skips.get("by_reason", {}).items()) or "none"
    print(f"[data] skipped {skips.get('skipped', 0)} of {skips.get('records', 0)} records: {by}", file=sys.stderr)
