"""Training observability: a tqdm progress bar, a JSONL metrics log (always) and optional wandb.

Only rank 0 writes. ``metrics.jsonl`` in the output directory gets one JSON
object per logged optimizer step (appended, so a resumed run continues the
same file) and a final ``{"event": "end", ...}`` summary. wandb is imported
lazily and only when ``logging.wandb_mode`` is not ``disabled``; the default
``offline`` mode writes under ``OUTPUT/wandb`` and never needs a network.
"""

from __future__ import annotations

import json
import math
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
        self.file = self.path.open("a", encoding="utf-8")
        if cfg.progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.wandb_mode != "disabled":
            import wandb  # lazy: never needed unless asked for

            self.wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.run_name or out.name, dir=str(out),
                                        mode=cfg.wandb_mode, config=run_config or {}, resume="allow")

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


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a ``metrics.jsonl`` (events left out)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r and "event" not in r]
