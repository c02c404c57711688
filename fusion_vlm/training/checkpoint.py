"""Atomic, resumable training checkpoints.

Layout of ``OUTPUT/checkpoint-0000100/``::

    ds/                  DeepSpeed engine state: trainable weights, optimizer + scheduler
                         (exclude_frozen_parameters: the frozen LLM is never written here)
    rank00000.json       per-rank state: Python/NumPy RNG, data skip counter
    rank00000.safetensors  per-rank torch RNG states (CPU and CUDA) as uint8 tensors
    trainer_state.json   written last: step, data position, counters

Everything is written to ``OUTPUT/.tmp-checkpoint-0000100`` and renamed when
complete, so a crash mid-save never leaves a half checkpoint that looks valid
(rank 0 renames; multi-node runs need a shared output directory). Only the
newest ``keep_last`` checkpoints are kept. DeepSpeed's own files are
``torch.save``-d and read back by DeepSpeed (acceptable for resuming your own
run); exported model weights (``OUTPUT/final``) are safetensors.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
DS_TAG = "ds"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = re.fullmatch(rf"{PREFIX}(\d+)", p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``checkpoint.resume`` -> the checkpoint to load: auto | never | a checkpoint (or output) directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise FileNotFoundError(f"checkpoint.resume='{resume}': not a checkpoint and holds no {PREFIX}* directory")
    return found


# ----------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-safe Python/NumPy RNG state, torch RNG states as tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    v, st, gauss = meta["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict, rank_state: dict,
                    keep_last: int, rank: int = 0) -> Path:
    """Collective: write ``checkpoint-<step>`` atomically and prune old ones; returns its path."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step:07d}"
    tmp = output_dir / f".tmp-{PREFIX}{step:07d}"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    meta, tensors = rng_state()
    (tmp / f"rank{rank:05d}.json").write_text(json.dumps({"rng": meta, **rank_state}))
    save_file(tensors, str(tmp / f"rank{rank:05d}.safetensors"))
    _barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # same step saved twice (e.g. periodic + end): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: str | Path, rank: int = 0) -> tuple[dict, dict]:
    """Collective: restore engine (weights, optimizer, scheduler) and this rank's RNG.

    Returns (trainer_state, rank_state without the RNG part).
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint '{path}': no {STATE_FILE} (incomplete or not a training checkpoint)")
    load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint '{path}': DeepSpeed found no engine state under {path / DS_TAG}")
    trainer_state = json.loads((path / STATE_FILE).read_text())
    rank_file = path / f"rank{rank:05d}.json"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint '{path}': no state for rank {rank} (resumed with more ranks?)")
    rank_state = json.loads(rank_file.read_text())
    set_rng_state(rank_state.pop("rng"), load_file(str(path / f"rank{rank:05d}.safetensors")))
    return trainer_state, rank_state
