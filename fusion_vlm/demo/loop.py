"""The small training loop that both stage-0 stand-ins (:mod:`.stage0`'s CLIP, :mod:`.text_llm`'s LLM) use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from fusion_vlm.training.engine import lr_factor


def deterministic(threads: int = 1) -> None:
    """Fix what decides the bits of a CPU run: ``threads`` intra-op threads, one inter-op thread,
    ``torch.use_deterministic_algorithms(True)``."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process (it can only be set before parallel work)
        pass
    torch.use_deterministic_algorithms(True)


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.1) -> float:
    """Learning rate of ``step`` (0-based) of ``steps``: the training loop's schedule (linear warm-up over
    ``warmup * steps``, then cosine to 0; :func:`fusion_vlm.training.engine.lr_factor`) times ``lr``."""
    return lr * lr_factor(step, steps, warmup, "cosine")


def batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index tensors long [min(batch_size, n)] into ``range(n)``: epochs of a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    bs = min(batch_size, n)
    for _ in range(steps):
        if order.numel() < bs:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:bs], order[bs:]
        yield idx


def optimise(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Iterable, steps: int, lr: float,
             loss_of: Callable[[object], torch.Tensor], desc: str, progress: bool,
             after_step: Callable[[], None] | None = None) -> list[float]:
    """For each batch: set the lr (:func:`lr_at`), backprop ``loss_of(batch)`` (a scalar tensor []), clip the
    gradient norm to 1, step, then call ``after_step()``; returns the per-step losses (``steps`` floats)."""
    losses = []
    model.train()
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress)
    for step, batch in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
