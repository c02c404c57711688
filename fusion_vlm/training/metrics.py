"""Training observability: a tqdm progress bar, a JSONL metrics log (always) and optional wandb.

Only rank 0 writes. ``metrics.jsonl`` in the output directory gets one JSON
object per logged optimizer step (appended, so a resumed run continues the
same file) and a final ``{"event": "end", ...}`` summary. wandb is off by
default (``logging.wandb_mode: disabled``: never imported). ``offline`` writes
under ``OUTPUT/wandb`` without any network access (see :func:`wandb_settings`);
``online`` streams to the wandb server.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from fusion_vlm.training.config import LoggingConfig


class MetricsLogger:
    """Progress bar + JSONL + wandb for one run (a no-op on ranks other than 0)."""

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0,
                 rank: int = 0, run_config: dict | None = None):
        self.enabled = rank == 0
        self.cfg = cfg
        self.total_steps, self.start_step = total_steps, start_step
        self.t0 = time.time()
        self.samples = self.tokens = 0
        self.bar = self.wandb_run = self.file = None
        if not self.enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        if self.path.is_file() and self.path.stat().st_size:  # a crash mid-line: keep the torn line on its own
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        else:
            torn = False
        self.file = self.path.open("a", encoding="utf-8")
        if torn:
            self.file.write("\n")
        if cfg.progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.wandb_mode != "disabled":
            self.wandb_run = start_wandb(cfg, out, run_config or {})

    def throughput(self, samples: int, tokens: int) -> tuple[float, float]:
        """Add this step's samples/tokens; return (samples/s, tokens/s) since this process started."""
        self.samples += samples
        self.tokens += tokens
        dt = max(time.time() - self.t0, 1e-9)
        return self.samples / dt, self.tokens / dt

    def eta_s(self, step: int) -> float:
        """Seconds left at the current rate of this process."""
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.time() - self.t0) / done * (self.total_steps - step)

    def log(self, step: int, metrics: dict) -> None:
        """Record the metrics of optimizer step ``step`` (1-based)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            show = {k: _fmt(metrics[k]) for k in ("loss", "contrastive", "identity", "generation", "lr",
                                                   "samples_per_s", "tokens_per_s") if k in metrics}
            if metrics.get("skipped_step"):
                show["loss"] = "skipped"  # not applied: the loss of an update that did not happen
            if metrics.get("skipped_steps"):
                show["skipped"] = str(metrics["skipped_steps"])
            self.bar.set_postfix(show, refresh=False)
        if step % self.cfg.every == 0 or step == self.total_steps:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(metrics, step=step)

    def event(self, name: str, **data) -> None:
        """Write a non-step record (resume, checkpoint, end) to the JSONL log."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"event": name, **data}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.file.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def wandb_settings(mode: str) -> dict:
    """Keyword arguments of ``wandb.Settings`` for ``mode``: offline turns off everything that could reach a server.

    wandb 0.2x/0.3x in offline mode still probes its server for telemetry when the process
    ends (a 10 s HTTP timeout without a network): error reporting is turned off, and the
    system metadata, machine info and git/code capture are skipped.
    """
    if mode != "offline":
        return {"mode": mode}
    return {"mode": "offline", "x_disable_meta": True, "x_disable_machine_info": True, "x_disable_viewer": True,
            "disable_git": True, "disable_code": True, "disable_job_creation": True}


def start_wandb(cfg: LoggingConfig, out: Path, run_config: dict):
    """``wandb.init`` for ``cfg.wandb_mode`` (offline: no network at all); returns the run."""
    import wandb  # lazy: never imported unless asked for

    if cfg.wandb_mode == "offline":
        os.environ["WANDB_ERROR_REPORTING"] = "false"  # no telemetry probe and wandb-core --no-observability
        wandb.setup(settings=wandb.Settings(**wandb_settings("offline")))
    print(f"[wandb] mode {cfg.wandb_mode}, files under {out / 'wandb'}"
          + (f"; upload later with: wandb sync {out / 'wandb'}/offline-run-*" if cfg.wandb_mode == "offline" else ""),
          file=sys.stderr)
    return wandb.init(project=cfg.wandb_project, name=cfg.run_name or out.name, dir=str(out), config=run_config,
                      resume="allow", settings=wandb.Settings(**wandb_settings(cfg.wandb_mode)))


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a ``metrics.jsonl`` in step order, events left out.

    A step logged twice (a run that crashed after logging it, resumed from an earlier
    checkpoint and redid it) appears once, as logged last; a torn line from a crash mid-write
    is ignored.
    """
    rows = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "step" in r and "event" not in r:
            rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]
