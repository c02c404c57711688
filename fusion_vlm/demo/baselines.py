"""The demo's baselines at the same N, the same frozen LLM and the same test split as the fusion model.

* ``all_tokens`` -- every merged vision token of the image goes to the LLM (``reducer=all``, the
  LLaVA-style ceiling); trained and evaluated once, N plays no part;
* ``avgpool`` -- the merged tokens average-pooled to N (``reducer=avgpool``);
* ``random`` -- N merged tokens drawn at random, in their order (``reducer=random``).

avgpool and random each train ONE projector with N drawn per micro-batch from the N sweep
(``n_queries_choices``, as the elastic stage 2 does) and are evaluated at every N. Every baseline starts
from the stage-1 export (its vision tower, merge and, through its config, the same frozen LLM) with a
fresh projector, the only part trained (generation stage, vision and merge frozen), for the steps and
learning rate of the demo's generation stage (the projector's lr scale kept, the others dropped).
See :mod:`fusion_vlm.reducers` for how each reducer picks its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_vlm.config import ModelConfig
from fusion_vlm.schema import from_dict, to_dict


@dataclass(frozen=True)
class BaselineRun:
    """One baseline of the demo."""

    mode: str  # its name in results and report: all_tokens | avgpool | random
    reducer: str  # ModelConfig.reducer it runs with
    eval_n: tuple[int, ...]  # N it is evaluated at (all_tokens: one N, which its reducer ignores)
    train_n: tuple[int, ...]  # N drawn per micro-batch in training (n_queries_choices); () = fixed, unused N

    @property
    def per_n(self) -> bool:
        """True when the baseline's tokens depend on N (avgpool, random): one result per N."""
        return bool(self.train_n)


def baseline_runs(n_values) -> list[BaselineRun]:
    """The baselines for the N sweep ``n_values``: all_tokens (once), avgpool and random (at every N)."""
    n = tuple(int(v) for v in n_values)
    if not n:
        raise ValueError("n_values: the baselines need at least one N")
    return [BaselineRun("all_tokens", "all", (max(n),), ()),
            BaselineRun("avgpool", "avgpool", n, n),
            BaselineRun("random", "random", n, n)]


def baseline_init(stage1_dir: str | Path, reducer: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``out_dir`` (a ``save_pretrained`` checkpoint): a ``reducer`` baseline started from the stage-1 export.

    Its vision tower, merge, CLIP text tower and contrastive head are stage 1's
    (:func:`fusion_vlm.reducers.transfer_shared`), its LLM the one stage 1's config names (a random tiny
    LLM is copied), its projector fresh (seeded by ``seed``); no fusion module. Kept when already written.
    """
    from fusion_vlm.model import FusionVLM
    from fusion_vlm.reducers import BASELINES, transfer_shared

    out_dir = Path(out_dir)
    if reducer not in BASELINES:
        raise ValueError(f"reducer={reducer!r}: expected one of {', '.join(BASELINES)}")
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    stage1 = FusionVLM.from_pretrained(stage1_dir, overrides=["llm.load=true"])
    if stage1.fusion is None:
        raise ValueError(f"'{stage1_dir}' is a baseline checkpoint (reducer={stage1.config.reducer}), not a stage-1 "
                         f"export")
    cfg = from_dict(ModelConfig, to_dict(stage1.config))
    cfg.reducer = reducer
    torch.manual_seed(seed)
    model = FusionVLM(cfg)
    transfer_shared(stage1, model)
    model.llm.load_state_dict(stage1.llm.state_dict())  # the same frozen LLM (a no-op copy for a path LLM)
    return model.save_pretrained(out_dir)


def baseline_train_config(run: BaselineRun, init_dir: str | Path, out: Path, data_dir: Path, size, steps: int,
                          seed: int):
    """The TrainConfig of ``run`` from ``init_dir`` (:func:`baseline_init`): the demo's generation-stage config
    (:func:`fusion_vlm.demo.stages.stage_train_config`) with N drawn from ``run.train_n`` (all_tokens: N fixed)
    and only the projector's lr scale. ``size``: any object with ``micro_batch``, ``lr``, ``n_values``."""
    from fusion_vlm.demo.stages import stage_settings, stage_train_config

    extra = {"init_from": str(init_dir)}
    if not run.train_n:
        extra["n_queries"] = run.eval_n[0]
    cfg = stage_train_config("generation", Path(out), Path(data_dir), size, steps, seed,
                                 settings=stage_settings(size, "baselines"), **extra)
    cfg.n_queries_choices = list(run.train_n)
    cfg.optim.lr_scale = {k: v for k, v in cfg.optim.lr_scale.items() if k == "projector"}  # the rest is frozen
    cfg.validate()
    return cfg


def train_baseline(run: BaselineRun, stage1_dir: str | Path, out: str | Path, data_dir: str | Path, size,
                   steps: int, seed: int = 0) -> Path:
    """Train ``run`` through :func:`fusion_vlm.training.loop.train` into ``out`` unless ``out/final`` exists;
    returns ``out/final``. Starts from ``out/init`` (:func:`baseline_init` of ``stage1_dir``)."""
    from fusion_vlm.training.loop import train

    out = Path(out)
    final = out / "final"
    if (final / "model.safetensors").is_file():
        print(f"[demo] baseline {run.mode}: trained earlier, skipped")
        return final
    init = baseline_init(stage1_dir, run.reducer, out / "init", seed)
    train(baseline_train_config(run, init, out, Path(data_dir), size, steps, seed))
    return final


def evaluate_baseline(run: BaselineRun, final_dir: str | Path, examples, eval_dir: str | Path, seed: int = 0,
                      **eval_kwargs) -> dict:
    """Scores of ``run`` on ``examples`` per N: {N: evaluate()'s dict} (all_tokens: {None: ...}).

    Each N's scores and per-item predictions are written to ``eval_dir/<mode>_n<N>.json`` (all_tokens:
    ``<mode>.json``) by :func:`fusion_vlm.demo.evaluate.evaluate_to` and read back when already there.
    ``eval_kwargs``: batch_images, max_new_tokens, short_new_tokens.
    """
    from fusion_vlm.demo.evaluate import evaluate_to
    from fusion_vlm.model import FusionVLM

    def load():
        torch.manual_seed(seed)
        return FusionVLM.from_pretrained(final_dir)

    results = {}
    for n in run.eval_n:
        name = f"{run.mode}_n{n}" if run.per_n else run.mode
        # the reducer ignores the question; use_question only keeps the prompt layout of the vqq mode
        results[n if run.per_n else None] = evaluate_to(Path(eval_dir) / f"{name}.json", load, examples, n, True,
                                                        label=run.mode, **eval_kwargs)
    return results


def run_baseline(run: BaselineRun, stage1_dir: str | Path, out: str | Path, data_dir: str | Path, size,
                 steps: int, examples, seed: int = 0, **eval_kwargs) -> dict:
    """Train (:func:`train_baseline`, into ``out``) then evaluate (:func:`evaluate_baseline`, into ``out/eval``)."""
    final = train_baseline(run, stage1_dir, out, data_dir, size, steps, seed)
    return evaluate_baseline(run, final, examples, Path(out) / "eval", seed, **eval_kwargs)
