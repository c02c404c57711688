"""N-sweep bookkeeping: plan (mode, N, dataset) cells, run the missing ones, collect one tidy CSV.

Modes (paper Appendix D; the same codes as paper_appendix_scores.csv):

* ``vqq``   -- vision + question + queries: the stage-3 checkpoint for N, question fused;
* ``vq_ft`` -- vision + queries, fine-tuned without the question: its own checkpoint, question dropped;
* ``vq``    -- vision + queries, question dropped from the ``vqq`` checkpoint without fine-tuning.

Each finished cell leaves ``<out>/cells/<mode>_N<n>/<dataset>.scores.json``
(its scores and set-up) and, when the evaluation returns them, its per-item
records ``<dataset>.items.jsonl`` (:mod:`fusion_vlm.evaluation.items`); a rerun
skips cells whose scores file exists. :func:`collect_scores` turns all of them
into the long CSV ``metric,mode,n_queries,score`` of ``paper_appendix_scores.csv``,
and :func:`write_csv` puts the set-ups (``<csv stem>.setup.json``) and the items
(``<csv stem>.items.jsonl``) next to it, so a fit can be redone and bootstrapped
over items without rerunning a model. :func:`elastic_checkpoints` maps every N
of a sweep to one checkpoint trained for all of them (``n_queries_choices``).
This module does not import VLMEvalKit: the evaluation itself is a callable.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from fusion_vlm.errors import CheckpointError, MissingFileError, UsageError, user_input
from fusion_vlm.evaluation.items import item_path, read_items, tag_items, write_items
from fusion_vlm.evaluation.settings import MODES, EvalResult, resolve_max_new_tokens

CSV_FIELDS = ("metric", "mode", "n_queries", "score")
_SAFE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Cell:
    """One evaluation: a checkpoint run in a mode with N queries on one dataset."""

    mode: str
    n_queries: int
    dataset: str
    checkpoint: str

    @property
    def use_question(self) -> bool:
        return self.mode == "vqq"

    @property
    def group(self) -> str:
        """The (mode, N) group name; also a safe file-name part."""
        return f"{self.mode}_N{self.n_queries}"


def parse_checkpoints(specs: Iterable[str], n_of: Callable[[str], int] | None = None) -> dict[int, str]:
    """``["64=DIR", "DIR2", ...]`` -> ``{N: DIR}``; a bare DIR takes N from its ``config.yaml``."""
    if n_of is None:
        from fusion_vlm.evaluation.runner import checkpoint_n_queries as n_of
    out: dict[int, str] = {}
    for spec in specs:
        head, sep, tail = spec.partition("=")
        if sep and head.strip().isdigit():
            n, path = int(head), tail
        elif sep and not Path(spec).exists():
            raise UsageError(f"checkpoint spec {spec!r}: expected N=DIR with an integer N")
        else:
            n, path = None, spec
        if not Path(path).is_dir():
            raise MissingFileError(f"checkpoint directory not found: {path}")
        if n is None:
            with user_input(CheckpointError):
                n = n_of(path)
        if n < 1:
            raise UsageError(f"checkpoint spec {spec!r}: N must be >= 1")
        if n in out:
            raise UsageError(f"two checkpoints for N={n}: {out[n]} and {path}")
        out[n] = path
    return out


def checkpoint_max_queries(checkpoint: str | Path) -> int:
    """The largest N a checkpoint can run: ``fusion.max_queries`` of its ``config.yaml`` (its query codebook)."""
    import yaml

    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"checkpoint '{checkpoint}': no config.yaml (not a FusionVLM checkpoint)")
    cfg = yaml.safe_load(path.read_text()) or {}
    n = (cfg.get("fusion") or {}).get("max_queries") if isinstance(cfg, dict) else None
    if not isinstance(n, int):
        raise CheckpointError(f"checkpoint '{checkpoint}': config.yaml has no integer fusion.max_queries")
    return n


def elastic_checkpoints(specs: Iterable[str], n_values: Iterable[int], option: str = "--checkpoint"
                        ) -> dict[int, str]:
    """One checkpoint for every N: ``["DIR"]`` and ``[1, 4, 16]`` -> ``{1: DIR, 4: DIR, 16: DIR}``.

    The checkpoint must hold query slots for the largest N (``fusion.max_queries``); slots are nested
    (N slots = the first N-1 codebook rows + ``<eos>``), so a model trained with ``n_queries_choices``
    serves every N it drew. Raises a one-line error naming the bad input.
    """
    specs, n_values = list(specs), sorted(set(int(n) for n in n_values))
    if len(specs) != 1 or ("=" in specs[0] and not Path(specs[0]).exists()):
        raise UsageError(f"{option} with --n-queries takes one checkpoint directory (one model for every N), "
                         f"got {' '.join(specs) or 'none'}")
    path = specs[0]
    if not Path(path).is_dir():
        raise MissingFileError(f"checkpoint directory not found: {path}")
    if not n_values or n_values[0] < 1:
        raise UsageError(f"--n-queries {' '.join(map(str, n_values))}: every N must be >= 1")
    with user_input(CheckpointError):
        top = checkpoint_max_queries(path)
    if n_values[-1] > top:
        raise UsageError(f"--n-queries {n_values[-1]}: checkpoint '{path}' has query slots for N <= {top} "
                         f"(fusion.max_queries)")
    return {n: path for n in n_values}


def plan_cells(checkpoints: Mapping[int, str], datasets: Iterable[str], modes: Iterable[str] = MODES,
               ft_checkpoints: Mapping[int, str] | None = None) -> list[Cell]:
    """All cells of the sweep, ordered by mode, then N, then dataset.

    ``checkpoints`` maps N to the stage-3 checkpoint trained with the question
    (used by ``vqq`` and ``vq``); ``ft_checkpoints`` maps N to the one fine-tuned
    without it (used by ``vq_ft``, which needs one for every N).
    """
    modes, datasets = list(modes), list(datasets)
    for m in modes:
        if m not in MODES:
            raise UsageError(f"unknown mode {m!r}; expected one of {', '.join(MODES)}")
    for d in datasets:
        if not _SAFE.match(d):
            raise UsageError(f"dataset name {d!r} must be letters, digits and _.+- only")
    if not datasets:
        raise UsageError("no datasets given")
    ft_checkpoints = dict(ft_checkpoints or {})
    cells = []
    for mode in modes:
        source = ft_checkpoints if mode == "vq_ft" else checkpoints
        if not source:
            what = "--ft-checkpoint" if mode == "vq_ft" else "--checkpoint"
            raise UsageError(f"mode {mode} needs at least one {what}")
        if mode == "vq_ft" and checkpoints and set(checkpoints) - set(ft_checkpoints):
            missing = sorted(set(checkpoints) - set(ft_checkpoints))
            raise UsageError(f"mode vq_ft has no fine-tuned checkpoint for N={missing}")
        for n in sorted(source):
            for d in datasets:
                cells.append(Cell(mode, int(n), d, str(source[n])))
    return cells


def score_path(out_dir: str | Path, cell: Cell) -> Path:
    return Path(out_dir) / "cells" / cell.group / f"{cell.dataset}.scores.json"


def is_done(out_dir: str | Path, cell: Cell) -> bool:
    return score_path(out_dir, cell).is_file()


def check_done_cells(out_dir: str | Path, cells: Iterable[Cell], prompt_set: str, max_new_tokens: int | None,
                     do_sample: bool = False) -> None:
    """Refuse to skip finished cells that were scored with another prompt set, answer length or sampling.

    A cell file without a recorded set-up is not checked. Raises a one-line ``UsageError`` naming the cells.
    """
    stale = []
    for cell in cells:
        path = score_path(out_dir, cell)
        if not path.is_file():
            continue
        setup = json.loads(path.read_text()).get("setup") or {}
        if not setup:
            continue
        want = {"prompt_set": prompt_set, "do_sample": bool(do_sample),
                "max_new_tokens": resolve_max_new_tokens(max_new_tokens, cell.dataset, setup.get("dataset_type"))}
        diff = [f"{k} {setup[k]!r}" for k, v in want.items() if k in setup and setup[k] != v]
        if diff:
            stale.append(f"{cell.group}/{cell.dataset} ({', '.join(diff)})")
    if stale:
        raise UsageError(f"{len(stale)} finished cell(s) in {out_dir} were scored with other settings: "
                         f"{'; '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}; use a new --out or delete them")


def items_path(out_dir: str | Path, cell: Cell) -> Path:
    """The per-item records of a cell: ``<out>/cells/<mode>_N<n>/<dataset>.items.jsonl``."""
    return Path(out_dir) / "cells" / cell.group / f"{cell.dataset}.items.jsonl"


def write_cell_scores(out_dir: str | Path, cell: Cell, metrics: Mapping[str, float],
                      setup: Mapping | None = None, items: Iterable[Mapping] | None = None) -> Path:
    """Record a finished cell (scores, set-up and, when given, its per-item records) atomically (write then
    rename, the items first): no half file on interrupt, and a scores file means the cell is complete."""
    path = score_path(out_dir, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(items or [])
    if items:
        write_items(items_path(out_dir, cell), tag_items(items, cell.mode, cell.n_queries, cell.dataset))
    else:  # a redone cell without items: no stale items of an earlier run
        items_path(out_dir, cell).unlink(missing_ok=True)
    payload = {"cell": asdict(cell), "setup": dict(setup or {}),
               "metrics": {str(k): float(v) for k, v in metrics.items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


EvaluateFn = Callable[[Cell, Path], Mapping[str, float] | EvalResult]


def run_sweep(out_dir: str | Path, cells: list[Cell], evaluate: EvaluateFn, csv_path: str | Path | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Evaluate every unfinished cell, then write the tidy CSV; returns the CSV path.

    ``evaluate(cell, work_dir)`` returns ``{"<metric>@<benchmark>": score}`` or an
    :class:`~fusion_vlm.evaluation.settings.EvalResult` (scores, set-up and per-item
    records, all recorded); ``work_dir`` is ``<out>/work/<mode>_N<n>`` (one per group, so
    VLMEvalKit's own prediction files are shared by the datasets of a group). A
    cell that raises stays unfinished and the error propagates after the CSV is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if not is_done(out_dir, c)]
    log(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    error = None
    for i, cell in enumerate(todo, 1):
        log(f"sweep: [{i}/{len(todo)}] {cell.group} {cell.dataset} ({cell.checkpoint})")
        work = out_dir / "work" / cell.group
        work.mkdir(parents=True, exist_ok=True)
        try:
            result = evaluate(cell, work)
        except Exception as err:  # noqa: BLE001 - keep the finished cells, report at the end
            log(f"sweep: {cell.group} {cell.dataset} failed: {err}")
            error = error or err
            continue
        metrics, setup, items = ((result.metrics, result.setup, result.items) if isinstance(result, EvalResult)
                                 else (result, {}, []))
        if not metrics:
            log(f"sweep: {cell.group} {cell.dataset} produced no scores")
            error = error or RuntimeError(f"{cell.group} {cell.dataset} produced no scores")
            continue
        write_cell_scores(out_dir, cell, metrics, setup, items)
    path = write_csv(collect_scores(out_dir), csv_path or out_dir / "scores.csv", setups=collect_setups(out_dir),
                     items=collect_items(out_dir))
    log(f"sweep: wrote {path}")
    if error is not None:
        raise error
    return path


def collect_scores(out_dir: str | Path) -> list[dict]:
    """Every recorded score under ``out_dir`` as long rows, sorted by metric, mode, then N (descending)."""
    rows = []
    for path in sorted((Path(out_dir) / "cells").glob("*/*.scores.json")):
        data = json.loads(path.read_text())
        cell = data["cell"]
        for metric, score in data["metrics"].items():
            rows.append({"metric": metric, "mode": cell["mode"], "n_queries": int(cell["n_queries"]),
                         "score": float(score)})
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["metric"], order.get(r["mode"], 99), -r["n_queries"]))
    return rows


def collect_setups(out_dir: str | Path) -> list[dict]:
    """The set-up of every recorded cell under ``out_dir`` (cell fields first), in file order."""
    out = []
    for path in sorted((Path(out_dir) / "cells").glob("*/*.scores.json")):
        data = json.loads(path.read_text())
        out.append({**data["cell"], **(data.get("setup") or {})})
    return out


def collect_items(out_dir: str | Path) -> list[dict]:
    """The per-item records of every recorded cell under ``out_dir`` (cells without them add nothing)."""
    return [rec for path in sorted((Path(out_dir) / "cells").glob("*/*.items.jsonl"))
            if path.with_name(path.name.replace(".items.jsonl", ".scores.json")).is_file()
            for rec in read_items(path)]


def setup_path(csv_path: str | Path) -> Path:
    """Where the set-ups of a scores CSV go: ``scores.csv`` -> ``scores.setup.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.setup.json")


def write_csv(rows: list[dict], path: str | Path, setups: list[dict] | None = None,
              items: list[dict] | None = None) -> Path:
    """Write rows in the ``metric,mode,n_queries,score`` format (scores rounded to 3 decimals).

    ``setups`` (one :func:`~fusion_vlm.evaluation.settings.eval_setup` record per
    evaluation behind the rows) go to :func:`setup_path` as ``{"csv": name, "evaluations": [...]}``;
    ``items`` (per-item records with mode, n_queries and dataset) to
    :func:`~fusion_vlm.evaluation.items.item_path` (``<csv stem>.items.jsonl``), when there are any (an
    empty list removes an earlier run's file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": round(float(r["score"]), 3)})
    if setups is not None:
        setup_path(path).write_text(json.dumps({"csv": path.name, "evaluations": list(setups)}, indent=1))
    if items:
        write_items(item_path(path), items)
    elif items is not None:  # none this time: no stale items of an earlier run beside the new scores
        item_path(path).unlink(missing_ok=True)
    return path
