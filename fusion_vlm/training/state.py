"""The training loop's bookkeeping: where a run stands (saved in checkpoints) and one step's running totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from fusion_vlm.errors import CheckpointError


@dataclass
class TrainerState:
    """Where a run stands; a checkpoint's ``trainer_state.json`` holds these keys plus total_steps and stage."""

    step: int = 0  # optimizer steps done (including resumed ones)
    epoch: int = 0  # epoch of the batch sampler
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per rank)
    nonfinite_steps: int = 0  # optimizer steps skipped for a NaN/Inf loss or gradient, in all
    nonfinite_in_a_row: int = 0  # ... in a row up to now (reset by an applied step)

    @property
    def applied_steps(self) -> int:
        """Optimizer steps that updated the weights."""
        return self.step - self.nonfinite_steps

    def to_dict(self, total_steps: int, stage: str) -> dict:
        """The JSON object of ``trainer_state.json``: the fields, ``total_steps`` and ``stage``."""
        return {**asdict(self), "total_steps": total_steps, "stage": stage}

    @classmethod
    def from_dict(cls, data: dict, where: str = "trainer state") -> TrainerState:
        """Read the fields back from a ``trainer_state.json`` object (extra keys ignored).

        A missing field is a one-line :class:`CheckpointError` naming ``where``.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise CheckpointError(f"{where}: no {', '.join(repr(n) for n in missing)}")
        return cls(**{n: data[n] for n in names})

    def record_step(self, applied: bool) -> None:
        """Count one more optimizer step's outcome in the NaN/Inf counters."""
        if applied:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1


@dataclass
class StepTotals:
    """What the micro-batches of one optimizer step add up to on this rank (a fresh one for every step)."""

    loss: float = 0.0  # sum of the micro-batch losses
    n: int = 0  # micro-batches that held samples (the ones whose samples were all skipped do not count)
    samples: int = 0  # samples seen
    tokens: int = 0  # LLM tokens seen
    lr: float | None = None  # the lr this step uses (read before its first micro-batch)
    terms: dict[str, float] = field(default_factory=dict)  # sums of the scalar loss terms other than "loss"

    def add(self, loss: torch.Tensor, named: dict[str, torch.Tensor], had_batch: bool, samples: int,
            tokens: int) -> None:
        """Add one micro-batch: its loss (a scalar tensor []), its named terms (scalar floats are summed)."""
        self.loss += float(loss.detach())
        self.n += 1 if had_batch else 0
        self.samples += samples
        self.tokens += tokens
        for k, v in named.items():
            if k != "loss" and torch.is_tensor(v) and v.numel() == 1 and v.is_floating_point():
                self.terms[k] = self.terms.get(k, 0.0) + float(v)
