"""Atomic, verified, resumable training checkpoints.

Layout of ``OUTPUT/checkpoint-0000100/``::

    ds/                  DeepSpeed engine state: trainable weights, optimizer + scheduler
                         (exclude_frozen_parameters: the frozen LLM is never written here)
    rank00000.json       per-rank state: Python/NumPy RNG, data skip counter
    rank00000.safetensors  per-rank torch RNG states (CPU and CUDA) as uint8 tensors
    trainer_state.json   step, data position, counters
    manifest.json        written last: size and sha256 of every other file

Everything is written to ``OUTPUT/.tmp-checkpoint-0000100``, flushed to disk
and renamed when complete, so a crash mid-save never leaves a half checkpoint
that looks valid (rank 0 renames; multi-node runs need a shared output
directory). Only the newest ``keep_last`` checkpoints are kept.

Before resuming, :func:`verify_checkpoint` checks a checkpoint against its
manifest (every file present, same size, same sha256) and parses its JSON
files and safetensors headers; :func:`find_resume` falls back to the newest
intact checkpoint with a one-line warning naming the damaged file, or stops
with a one-line :class:`CheckpointError` when none is intact. Checkpoints
written before manifests existed are checked as far as they can be: JSON,
safetensors headers and sizes, and the CRC-32 of every record in DeepSpeed's
``torch.save`` zip archives. DeepSpeed's own files are ``torch.save``-d and
read back by DeepSpeed (acceptable for resuming your own run); exported model
weights (``OUTPUT/final``) are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from fusion_vlm.errors import CheckpointError, MissingFileError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
DS_TAG = "ds"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first (not verified)."""
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
    """The newest complete checkpoint in ``output_dir``, or None (not verified)."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _candidates(resume: str, output_dir: str | Path) -> list[Path]:
    """The checkpoints ``checkpoint.resume`` names, newest first (empty for never, or auto without any)."""
    if resume == "never":
        return []
    if resume == "auto":
        return [p for _, p in reversed(list_checkpoints(output_dir))]
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return [p]
    found = [c for _, c in reversed(list_checkpoints(p))]
    if not found:
        raise MissingFileError(f"checkpoint.resume='{resume}': not a checkpoint and holds no {PREFIX}* directory")
    return found


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``checkpoint.resume`` -> the checkpoint it names: auto | never | a checkpoint (or output) directory.

    Not verified; :func:`find_resume` is what training calls.
    """
    found = _candidates(resume, output_dir)
    return found[0] if found else None


def find_resume(resume: str, output_dir: str | Path, warn: bool = True) -> Path | None:
    """``checkpoint.resume`` -> the intact checkpoint to load (verified with :func:`verify_checkpoint`).

    ``auto`` and an output directory take the newest intact checkpoint there; each damaged
    newer one is skipped with a one-line warning naming the damaged file (printed when
    ``warn``). A named checkpoint directory is used only when intact. Raises a one-line
    :class:`CheckpointError` when checkpoints exist but none is intact.
    """
    found = _candidates(resume, output_dir)
    damaged = []
    for path in found:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            damaged.append(str(err))
            if warn:
                print(f"[checkpoint] warning: skipping damaged checkpoint {path.name}: {err}", file=sys.stderr)
            continue
        if damaged and warn:
            print(f"[checkpoint] resuming from {path}, the newest intact checkpoint", file=sys.stderr)
        return path
    if damaged:
        where = found[0] if len(found) == 1 else found[0].parent
        raise CheckpointError(f"no intact checkpoint to resume from in '{where}' ({len(damaged)} damaged, newest: "
                              f"{damaged[0]}); set checkpoint.resume=never to start over")
    return None


# ----------------------------------------------------------------------------- verification
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative, sorted), the manifest left out."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                  and p.name != MANIFEST)


def write_manifest(directory: str | Path, with_sha256: bool = True) -> dict:
    """Write ``manifest.json`` (size and sha256 of every other file) into ``directory``, flushed; returns it."""
    directory = Path(directory)
    files = {}
    for rel in _files(directory):
        p = directory / rel
        files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p) if with_sha256 else None}
    manifest = {"version": 1, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def _check_safetensors(path: Path) -> None:
    """The header parses and its tensors end exactly at the end of the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({err})") from None
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise CheckpointError(f"{path}: safetensors header has no valid data_offsets") from None
    if 8 + n + max(ends, default=0) != size:
        raise CheckpointError(f"{path}: truncated or padded safetensors file ({size} bytes, header describes "
                              f"{8 + n + max(ends, default=0)})")


def _check_zip(path: Path) -> None:
    """A ``torch.save`` archive whose every record matches its CRC-32."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable torch.save archive ({err})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: record '{bad}' fails its CRC-32 check (damaged)")


def verify_checkpoint(path: str | Path) -> dict:
    """Check a checkpoint before resuming from it; returns its trainer state.

    With ``manifest.json``: every listed file exists with its size and sha256. Always: the
    JSON files parse, the safetensors headers match the file sizes, ``ds/`` holds model
    states. Without a manifest (older checkpoints) or without hashes, DeepSpeed's zip
    archives are also checked record by record (CRC-32). Raises :class:`CheckpointError`
    naming the first damaged file.
    """
    path = Path(path)
    state = _read_json(path / STATE_FILE, "trainer state")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / STATE_FILE}: no integer 'step'")
    for p in sorted(path.glob("rank*.json")):
        _read_json(p, "rank state")
    for p in sorted(path.glob("rank*.safetensors")):
        _check_safetensors(p)
    hashed: set[str] = set()
    if (path / MANIFEST).exists():
        files = _read_json(path / MANIFEST, "manifest").get("files")
        if not isinstance(files, dict) or not files:
            raise CheckpointError(f"{path / MANIFEST}: lists no files")
        for rel, entry in files.items():
            p = path / rel
            if not isinstance(entry, dict):
                raise CheckpointError(f"{path / MANIFEST}: entry for '{rel}' is not an object")
            if not p.is_file():
                raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
            size = p.stat().st_size
            if size != entry.get("size"):
                raise CheckpointError(f"{p}: {size} bytes, {entry.get('size')} when saved (truncated or damaged)")
            if entry.get("sha256"):
                if _sha256(p) != entry["sha256"]:
                    raise CheckpointError(f"{p}: sha256 differs from the one recorded when saved (damaged)")
                hashed.add(rel)
    ds = path / DS_TAG
    if not ds.is_dir() or not list(ds.glob("*model_states.pt")):
        raise CheckpointError(f"{ds}: missing DeepSpeed engine state (no {DS_TAG}/*model_states.pt)")
    for p in sorted(ds.glob("*.pt")):
        if str(p.relative_to(path)) not in hashed:
            _check_zip(p)
    return state


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
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory`` to disk, so that after a power loss the renamed
    checkpoint never points at empty or zero-filled files."""
    for p in directory.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    for d in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        _fsync_dir(d)


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict, rank_state: dict,
                    keep_last: int, rank: int = 0, with_sha256: bool = True) -> Path:
    """Collective: write ``checkpoint-<step>`` atomically with its manifest and prune old ones; returns its path.

    Pruning keeps the newest ``keep_last`` checkpoints up to ``step``; checkpoints of later
    steps (left by a run that resumed from an earlier one) are replaced when their step is saved again.
    """
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
        _fsync_tree(tmp)
        write_manifest(tmp, with_sha256)
        if final.exists():  # same step saved twice (e.g. periodic + end, or redone after a resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(output_dir)
        for _, old in [c for c in list_checkpoints(output_dir) if c[0] <= step][:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: str | Path, rank: int = 0) -> tuple[dict, dict]:
    """Collective: restore engine (weights, optimizer, scheduler) and this rank's RNG.

    Returns (trainer_state, rank_state without the RNG part). Call :func:`verify_checkpoint`
    (or :func:`find_resume`) first; a checkpoint DeepSpeed still cannot load (e.g. saved
    from another model config) raises a one-line :class:`CheckpointError`.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint '{path}': no {STATE_FILE} (incomplete or not a training checkpoint)")
    try:
        load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint '{path}': DeepSpeed could not load {DS_TAG}/: {first}") from err
    if load_path is None:
        raise CheckpointError(f"checkpoint '{path}': DeepSpeed found no engine state under {path / DS_TAG}")
    trainer_state = _read_json(path / STATE_FILE, "trainer state")
    rank_file = path / f"rank{rank:05d}.json"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint '{path}': no state for rank {rank} (resumed with more ranks?)")
    rank_state = _read_json(rank_file, "rank state")
    try:
        tensors = load_file(str(path / f"rank{rank:05d}.safetensors"))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path / f'rank{rank:05d}.safetensors'}: unreadable ({err})") from None
    set_rng_state(rank_state.pop("rng"), tensors)
    return trainer_state, rank_state
