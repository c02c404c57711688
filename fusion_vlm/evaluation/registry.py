"""Register FusionVLM checkpoints with VLMEvalKit and run benchmarks in-process.

Nothing in VLMEvalKit is edited: :func:`register_entries` adds
``functools.partial(FusionVLMEval, checkpoint=..., n_queries=..., use_question=...)``
to ``vlmeval.config.supported_VLM`` under a name per checkpoint x N x mode, and
:func:`run_eval` calls VLMEvalKit's own ``build_dataset``, ``infer_data_job``
and ``dataset.evaluate`` for each (entry, dataset), with exact matching as the
default judge, so no API key is needed. Unlike ``vlmeval.run.main``, a failure
is raised, not logged and swallowed. Every result is written with its set-up
(:func:`fusion_vlm.evaluation.settings.eval_setup`) and its per-item records
(question, prediction, answer and the judge's per-item score where it gives one:
:func:`prediction_items`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusion_vlm.errors import MissingFileError, UsageError
from fusion_vlm.evaluation.prompts import dataset_kind
from fusion_vlm.evaluation.items import items_from_tables, write_items
from fusion_vlm.evaluation.results import extract_metrics
from fusion_vlm.evaluation.settings import MODES, EvalResult, eval_setup
from fusion_vlm.evaluation.vlmeval_import import INSTALL_HINT, import_vlmeval  # noqa: F401 (public here too)


@dataclass(frozen=True)
class ModelEntry:
    """One VLMEvalKit model: a checkpoint run with N queries in a mode."""

    name: str
    checkpoint: str
    mode: str
    n_queries: int | None = None  # None = the checkpoint's own N
    options: dict = field(default_factory=dict, compare=False)  # max_new_tokens, prompt_set, batch_size, seed, ...

    @property
    def use_question(self) -> bool:
        return self.mode == "vqq"

    def kwargs(self) -> dict:
        return {"n_queries": self.n_queries, "use_question": self.use_question, **self.options}


def entry_name(checkpoint: str | Path, n_queries: int | None, mode: str) -> str:
    """``FusionVLM_<checkpoint dir>_N<n>_<mode>`` with unsafe characters replaced (names become file names)."""
    tag = re.sub(r"[^A-Za-z0-9.+-]+", "-", Path(checkpoint).resolve().name).strip("-") or "ckpt"
    return f"FusionVLM_{tag}_N{'ckpt' if n_queries is None else n_queries}_{mode}"


def grid_entries(checkpoints: Iterable[str | Path], n_values: Iterable[int | None] = (None,),
                 modes: Iterable[str] = ("vqq",), **options) -> list[ModelEntry]:
    """Entries for every checkpoint x N x mode (``vqq`` fuses the question; ``vq``/``vq_ft`` drop it)."""
    entries, seen = [], set()
    for ckpt in checkpoints:
        if not (Path(ckpt) / "config.yaml").is_file():
            raise MissingFileError(f"checkpoint '{ckpt}': no config.yaml (not a FusionVLM checkpoint)")
        for n in n_values:
            if n is not None and n < 1:
                raise UsageError(f"n_queries={n}: must be >= 1")
            for mode in modes:
                if mode not in MODES:
                    raise UsageError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
                name = entry_name(ckpt, n, mode)
                if name in seen:
                    raise UsageError(f"two checkpoints give the same model name {name}; rename one directory")
                seen.add(name)
                entries.append(ModelEntry(name, str(ckpt), mode, n, dict(options)))
    return entries


def register_entries(entries: Iterable[ModelEntry]) -> list[str]:
    """Add each entry to ``vlmeval.config.supported_VLM``; returns the names."""
    import_vlmeval()
    from vlmeval.config import supported_VLM

    from fusion_vlm.evaluation.vlmeval_model import model_class

    cls = model_class()
    names = []
    for e in entries:
        supported_VLM[e.name] = functools.partial(cls, checkpoint=e.checkpoint, **e.kwargs())
        names.append(e.name)
    return names


def _prefill(model, dataset, pred_root: Path, model_name: str, batch_size: int, log: Callable) -> None:
    """Batched inference into the resume file that VLMEvalKit's ``infer_data`` reads (single process).

    ``infer_data`` then finds every index answered and only writes the prediction file.
    """
    from vlmeval.smp import dump, get_pred_file_path, load

    name = dataset.dataset_name
    if Path(get_pred_file_path(str(pred_root), model_name, name, use_env_format=True)).exists():
        return  # VLMEvalKit reuses a finished prediction file itself
    out_file = pred_root / f"01_{name}.pkl"  # {rank}{world_size}_{dataset}.pkl, rank 0 of 1
    res = load(str(out_file)) if out_file.exists() else {}
    model.set_dump_image(dataset.dump_image)
    data = dataset.data[~dataset.data["index"].isin(res)]
    force = getattr(dataset, "force_use_dataset_prompt", False)
    for start in range(0, len(data), batch_size):
        rows = [data.iloc[i] for i in range(start, min(start + batch_size, len(data)))]
        structs = [dataset.build_prompt(r) if force or not model.use_custom_prompt(name)
                   else model.build_prompt(r, dataset=name) for r in rows]
        for row, answer in zip(rows, model.generate_batch(structs, name)):
            res[row["index"]] = answer
        dump(res, str(out_file))
        log(f"eval: {model_name} {name}: {len(res)}/{len(dataset.data)} answered")


def run_eval(entries: list[ModelEntry], datasets: list[str], work_dir: str | Path, judge: str = "exact_matching",
             judge_kwargs: dict | None = None, nproc: int = 1, data_root: str | Path | None = None,
             batch_size: int = 8, log: Callable[[str], None] = print,
             model_cache: dict | None = None) -> dict[str, dict[str, EvalResult]]:
    """Run every dataset for every entry; returns ``{model name: {dataset: EvalResult}}``.

    An :class:`EvalResult` holds ``metrics`` (``{"metric@Bench": score}``) and
    ``setup`` (prompt set, max_new_tokens used, judge, batch size, seed, N, mode,
    package versions). Predictions and VLMEvalKit's score files go to
    ``<work_dir>/<model name>/`` (``<model>_<dataset>.tsv``, ``..._score.csv`` /
    ``..._acc.csv`` ...), and our summary (entry, setup, metrics) to
    ``<work_dir>/<model name>/<dataset>.fusion_metrics.json``.
    ``data_root`` becomes ``$LMUData`` (it must exist). ``batch_size > 1`` runs
    batched inference; 1 leaves inference to VLMEvalKit's per-sample loop.
    ``model_cache`` (name -> loaded model) lets a caller keep models across calls.
    """
    if not datasets:
        raise UsageError("no datasets given")
    env = {"PRED_FORMAT": os.environ.get("PRED_FORMAT") or "tsv"}  # VLMEvalKit's xlsx default needs xlsxwriter
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise MissingFileError(f"LMUData folder not found: {data_root}")
        env["LMUData"] = str(Path(data_root).resolve())
    with _environ(env):
        return _run_eval(entries, datasets, Path(work_dir), judge, judge_kwargs, nproc, batch_size, log,
                         {} if model_cache is None else model_cache)


@contextlib.contextmanager
def _environ(values: dict):
    """Set environment variables for VLMEvalKit (which reads them at call time) and restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_eval(entries, datasets, work_dir: Path, judge, judge_kwargs, nproc, batch_size, log, cache):
    names = register_entries(entries)
    from vlmeval.config import supported_VLM
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job
    from vlmeval.smp import get_pred_file_path

    results: dict[str, dict[str, EvalResult]] = {}
    for name in names:
        model = cache.get(name)
        pred_root = work_dir / name
        pred_root.mkdir(parents=True, exist_ok=True)
        for ds_name in datasets:
            dataset = build_dataset(ds_name)
            if dataset is None:
                raise MissingFileError(f"dataset {ds_name}: VLMEvalKit could not build it "
                                        f"(no {os.environ.get('LMUData', '~/LMUData')}/{ds_name}.tsv?)")
            if getattr(dataset, "MODALITY", "IMAGE") != "IMAGE" or dataset.TYPE == "MT":
                raise UsageError(f"dataset {ds_name}: {dataset.MODALITY} / {dataset.TYPE} benchmarks are not "
                                 f"supported (single-turn image benchmarks only)")
            if model is None:
                model = cache[name] = supported_VLM[name]()
            model.dataset_types[ds_name] = dataset.TYPE
            entry = next(e for e in entries if e.name == name)
            setup = entry_setup(entry, model, ds_name, dataset.TYPE, judge, judge_kwargs, batch_size)
            pred_file = get_pred_file_path(str(pred_root), name, ds_name, use_env_format=True)
            summary = pred_root / f"{ds_name}.fusion_metrics.json"
            check_reuse(summary, Path(pred_file), setup)
            if batch_size > 1:
                _prefill(model, dataset, pred_root, name, batch_size, log)
            model = infer_data_job(model, work_dir=str(pred_root), model_name=name, dataset=dataset)
            kwargs = {"nproc": nproc, "verbose": False, "retry": 3, **(judge_kwargs or {}), "model": judge}
            result = dataset.evaluate(pred_file, **kwargs)
            if result is None:
                raise RuntimeError(f"{name} x {ds_name}: VLMEvalKit's evaluate returned nothing")
            metrics = extract_metrics(ds_name, result, dataset_kind(dataset.TYPE, ds_name))
            items = prediction_items(pred_file)
            write_items(pred_root / f"{ds_name}.items.jsonl", items)
            summary.write_text(json.dumps({"entry": asdict(entry), "setup": setup, "metrics": metrics}, indent=1))
            log(f"eval: {name} {ds_name}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            results.setdefault(name, {})[ds_name] = EvalResult(metrics, setup, items)
    return results


JUDGED_SUFFIXES = (".tsv", ".xlsx", ".csv", ".json")  # per-item files VLMEvalKit's evaluate leaves


def prediction_items(pred_file: str | Path) -> list[dict]:
    """Per-item records of one prediction file (see :func:`fusion_vlm.evaluation.items.items_from_tables`).

    The per-item judgements are read from the files ``evaluate`` wrote beside it
    (``<pred stem>_auxmatch.tsv``: ``score``, ``..._result.tsv``: ``hit``, ``..._results.tsv``: ``eval_score``).
    """
    from vlmeval.smp import load

    pred = Path(pred_file)
    judged = []
    for path in sorted(pred.parent.glob(f"{pred.stem}_*")):
        if path.suffix.lower() not in JUDGED_SUFFIXES:
            continue
        try:
            table = load(str(path))
        except Exception:  # noqa: BLE001 - a file VLMEvalKit wrote in a shape we do not read: no per-item score
            continue
        if hasattr(table, "columns") and hasattr(table, "to_dict"):
            judged.append((path.name, table.to_dict("records")))
    return items_from_tables(load(str(pred)).to_dict("records"), judged)


GENERATION_KEYS = ("prompt_set", "max_new_tokens", "n_queries", "use_question", "do_sample", "multi_image")


def check_reuse(summary: Path, pred_file: Path, setup: dict) -> None:
    """Refuse to reuse a prediction file made with other generation settings (VLMEvalKit would, silently).

    ``summary`` is the ``<dataset>.fusion_metrics.json`` of the earlier run; without it nothing is checked.
    """
    if not (pred_file.exists() and summary.is_file()):
        return
    try:
        before = json.loads(summary.read_text()).get("setup") or {}
    except (json.JSONDecodeError, AttributeError):
        return
    diff = [f"{k} {before[k]!r} -> {setup.get(k)!r}" for k in GENERATION_KEYS
            if k in before and before[k] != setup.get(k)]
    if diff:
        raise UsageError(f"{pred_file} was generated with other settings ({'; '.join(diff)}); "
                         f"use a new work dir or delete it")


def entry_setup(entry: ModelEntry, model, dataset: str, dataset_type: str | None, judge: str | None,
                judge_kwargs: dict | None, batch_size: int) -> dict:
    """The set-up record of ``entry`` on ``dataset`` (see :func:`fusion_vlm.evaluation.settings.eval_setup`).

    ``model`` is the loaded VLMEvalKit model (its runner knows N when the entry leaves it to the checkpoint).
    """
    s = model.runner.settings
    return eval_setup(mode=entry.mode, n_queries=model.runner.n_queries_used(), checkpoint=entry.checkpoint,
                      dataset=dataset, dataset_type=dataset_type, prompt_set=model.prompt_set,
                      max_new_tokens=s.max_new_tokens, judge=judge, judge_kwargs=judge_kwargs,
                      batch_size=batch_size, seed=s.seed, do_sample=s.do_sample,
                      n_queries_later=s.n_queries_later, use_question=s.use_question, min_new_tokens=s.min_new_tokens,
                      multi_image=model.multi_image, model_name=entry.name)


def cell_evaluator(judge: str = "exact_matching", judge_kwargs: dict | None = None, nproc: int = 1,
                   data_root: str | Path | None = None, batch_size: int = 8, log: Callable[[str], None] = print,
                   **options) -> Callable:
    """An ``evaluate(cell, work_dir) -> EvalResult`` for :func:`fusion_vlm.evaluation.sweep.run_sweep`.

    Keeps the last loaded model, so consecutive datasets of one (mode, N) group load it once.
    """
    cache: dict = {}

    def evaluate(cell, work_dir):
        entry = ModelEntry(entry_name(cell.checkpoint, cell.n_queries, cell.mode), cell.checkpoint, cell.mode,
                           cell.n_queries, dict(options, batch_size=batch_size))
        if entry.name not in cache:
            cache.clear()
        res = run_eval([entry], [cell.dataset], work_dir, judge=judge, judge_kwargs=judge_kwargs, nproc=nproc,
                       data_root=data_root, batch_size=batch_size, log=log, model_cache=cache)
        return res[entry.name][cell.dataset]

    return evaluate
