"""The CPU demo end to end: world -> stand-ins -> stages 1-3 -> N-sweep -> baselines -> evaluation -> report.

The recipe is a :class:`fusion_vlm.demo.config.DemoConfig` (``configs/demo/quick.yaml``, ``full.yaml``).

Every training stage goes through the real entry point
(:func:`fusion_vlm.training.loop.train`, DeepSpeed on gloo); every stage writes
its outputs under ``out_dir`` and is skipped when they are already there, so a
rerun resumes where the last one stopped. Per-stage wall times go to
``timings.json`` and the report.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fusion_vlm.demo.config import DemoConfig, load_demo_config
from fusion_vlm.demo.stages import run_stage
from fusion_vlm.evaluation.settings import MODES  # vqq, vq_ft, vq (the paper's input modes)
from fusion_vlm.schema import apply_overrides, from_dict, save_config, to_dict

ELASTIC = "elastic"  # the stage-2 model (N drawn per micro-batch) run at every N, no stage-3 fine-tune
PRESET_NAMES = ("quick", "full")  # configs/demo/<name>.yaml


def __getattr__(name: str):
    """``SIZES``: {preset: DemoConfig} of ``configs/demo/`` (read on access; the recipe lives in the YAML)."""
    if name == "SIZES":
        return {p: load_demo_config(p) for p in PRESET_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def demo_world(seed: int = 0, config: str | Path | DemoConfig = "full"):
    """The world of a demo config (``configs/demo/<config>.yaml``, ``world``) with ``seed``.

    Both presets: 5 colours x 4 shapes with one held-out pair, 4-12 shapes and 1-3 glyphs per image on a
    4x4 layout, no global shortcut (skewed per-image weights, hard existence negatives, uniform attribute
    values, counting in regions), 8-10 questions per image, aspect ratios up to 2:1 and HD-4 views. Why
    each choice: docs/demo.md, "The synthetic world" and "Why each choice".
    """
    cfg = config if isinstance(config, DemoConfig) else load_demo_config(config)
    return replace(cfg.world, seed=seed)


class Timings:
    """Wall time per stage, persisted in ``timings.json`` so resumed runs keep earlier figures."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    @contextmanager
    def stage(self, name: str):
        print(f"\n=== {name}", flush=True)
        start = time.time()
        yield
        self.data[name] = round(self.data.get(name, 0.0) + time.time() - start, 1)
        self.path.write_text(json.dumps(self.data, indent=2))


def _context_probe(llm_dir: Path, examples, path: Path, max_new_tokens: int) -> dict:
    """How well the frozen stand-in LLM answers the test questions from each kind of text context
    ({kind: {family: accuracy %, descriptions item F1 %}}); cached in ``path``."""
    from fusion_vlm.demo.text_llm import context_accuracy

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(context_accuracy(llm_dir, examples, max_new_tokens=max_new_tokens), indent=2))
    return json.loads(path.read_text())


def _standins(s: DemoConfig, train_ex, out: Path) -> dict:
    """The stand-in CLIP and LLM of the run: {"clip_path", "llm_dir", "source"}. The shipped ones
    (:func:`fusion_vlm.demo.standins.shipped_standins`) when ``s.standins`` is shipped and the run's world is
    the one they were made for; else trained here by :func:`fusion_vlm.demo.stage0.run_stage0` (preset
    ``s.stage0``) into ``out``."""
    from fusion_vlm.demo import stage0
    from fusion_vlm.demo.standins import shipped_standins, shipped_world

    shipped = shipped_standins()
    if s.standins == "shipped":
        if s.world == shipped_world(0) and shipped["clip"].is_file():
            print(f"[demo] stand-ins: shipped ({shipped['dir']}; see its MODEL_CARD.md)", flush=True)
            probe = json.loads(shipped["probe"].read_text()) if shipped["probe"].is_file() else None
            return _record_standins(out, {"clip_path": shipped["clip"], "llm_dir": shipped["llm"],
                                          "source": "shipped with the package (fusion-vlm standins make)",
                                          "probe": probe})
        print("[demo] stand-ins: the shipped ones were made for another world (configs/demo/full.yaml, seed 0); "
              f"training them here (preset {s.stage0})", flush=True)
    pre = stage0.run_stage0(train_ex, out, s.stage0, seed=s.seed, world=s.world)
    return _record_standins(out, {"clip_path": pre["clip_path"], "llm_dir": pre["llm_dir"],
                                  "source": f"trained in the run (stage-0 preset {s.stage0}; probe them with "
                                            f"fusion-vlm standins probe --dir {out})", "probe": None})


def _record_standins(out: Path, info: dict) -> dict:
    """Write ``out/standins.json`` (where the stand-ins came from, their probe figures; read by the report)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "standins.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                   for k, v in info.items()}, indent=2))
    return info


def resolve(config: str | Path | DemoConfig = "full", seed: int | None = None,
            overrides: list[str] | None = None) -> DemoConfig:
    """The demo config of a preset name, a YAML path or a DemoConfig, with ``--set`` overrides and ``seed``."""
    if isinstance(config, DemoConfig):
        cfg = from_dict(DemoConfig, apply_overrides(to_dict(config), overrides)) if overrides else config
    else:
        cfg = load_demo_config(config, overrides)
    if seed is not None:
        cfg = replace(cfg, seed=seed, world=replace(cfg.world, seed=seed))
    cfg.validate()
    return cfg


def _record_config(cfg: DemoConfig, out: Path) -> None:
    """Write ``out/config.yaml``; warn when an earlier run in ``out`` used another config (its finished
    stages are reused as they are)."""
    path = out / "config.yaml"
    if path.is_file():
        before = load_demo_config(path)
        if before != cfg:
            print(f"[demo] warning: {out} holds a run of another config; finished stages are reused as they are "
                  f"(use a fresh --out to start over)", flush=True)
    save_config(cfg, path)


def run_demo(out_dir: str | Path = "demo_out", config: str | Path | DemoConfig = "full", seed: int | None = None,
             overrides: list[str] | None = None) -> Path:
    """Run (or resume) the whole demo in ``out_dir``; returns the path of ``report.md``.

    ``config``: a preset name of ``configs/demo/`` (quick | full), a YAML path or a :class:`DemoConfig`;
    ``overrides``: ``key=value`` strings on it; ``seed``: replaces the config's seed when given.
    """
    import torch

    from fusion_vlm.demo import stage0, world
    from fusion_vlm.demo.baselines import baseline_runs, evaluate_baseline, train_baseline
    from fusion_vlm.demo.evaluate import evaluate_to
    from fusion_vlm.demo.report import write_report
    from fusion_vlm.demo.scoring import shortcut_rules
    from fusion_vlm.model import FusionVLM

    s, out = resolve(config, seed, overrides), Path(out_dir)
    seed = s.seed
    out.mkdir(parents=True, exist_ok=True)
    _record_config(s, out)
    timings = Timings(out / "timings.json")
    data_dir = out / "data"
    wcfg = s.world
    with timings.stage("world"):
        train_ex = world.make_examples("train", s.train_images, wcfg)
        test_ex = world.make_examples("test", s.test_images, wcfg)
        if not (data_dir / "train.jsonl").is_file():
            world.export_llava(train_ex, data_dir, "train.jsonl")
            world.export_llava(test_ex, data_dir, "test.jsonl")
    with timings.stage("stage0 (CLIP + text-only LLM stand-ins)"):
        pre = _standins(s, train_ex, out / "stage0")
        reading = _context_probe(pre["llm_dir"], test_ex[:16], out / "stage0" / "context_probe.json",
                                 s.eval.max_new_tokens)
    model_yaml = out / "model.yaml"
    n_max = max(s.n_values)
    save_config(stage0.demo_model_config(pre["clip_path"], pre["llm_dir"], n_queries=n_max,
                                         overrides=list(s.model_overrides) + [f"fusion.max_queries={max(n_max, 8)}"]),
                model_yaml)
    with timings.stage("stage1 contrastive"):
        s1 = run_stage("contrastive", out / "stage1", data_dir, s, s.stage1.steps, seed, settings=s.stage1,
                    model=str(model_yaml))
    with timings.stage("stage2 generation"):
        s2 = run_stage("generation", out / "stage2", data_dir, s, s.stage2.steps, seed, settings=s.stage2,
                    init_from=str(s1))
    finals = {}
    with timings.stage("stage3 N-sweep fine-tunes"):
        for n in s.n_values:
            for variant, use_q in (("vqq", True), ("vq_ft", False)):
                finals[(variant, n)] = run_stage(
                    "generation", out / "stage3" / f"{variant}_n{n}", data_dir, s, s.stage3.steps, seed,
                    settings=s.stage3, init_from=str(s2), n_queries=n, use_question=use_q)
    baselines = []  # (run, final checkpoint) of each baseline: all merged tokens, avg-pool to N, N random tokens
    with timings.stage("baselines (all tokens, avg-pool, random)"):
        if s.baselines.steps:
            for run in baseline_runs(s.n_values):
                baselines.append((run, train_baseline(run, s1, out / "baselines" / run.mode, data_dir, s,
                                                      s.baselines.steps, seed)))
    results = {}
    with timings.stage("evaluation"):
        runs = [(mode, n, finals[("vq_ft" if mode == "vq_ft" else "vqq", n)], mode == "vqq")
                for n in s.n_values for mode in MODES]
        # one model for every N: stage 2 as trained, with the question, nested slots
        runs += [(ELASTIC, n, s2, True) for n in s.n_values]
        for mode, n, ckpt, use_q in runs:
            def load(ckpt=ckpt):
                torch.manual_seed(seed)
                return FusionVLM.from_pretrained(ckpt)

            results[(mode, n)] = evaluate_to(out / "eval" / f"{mode}_n{n}.json", load, test_ex, n, use_q,
                                             s.eval.batch_images, s.eval.max_new_tokens, label=mode,
                                             short_new_tokens=s.eval.short_new_tokens)
        for run, ckpt in baselines:  # avgpool / random at every N, all_tokens once (N = None: it ignores N)
            for n, scores in evaluate_baseline(run, ckpt, test_ex, out / "eval", seed, batch_images=s.eval.batch_images,
                                               max_new_tokens=s.eval.max_new_tokens,
                                               short_new_tokens=s.eval.short_new_tokens).items():
                results[(run.mode, n)] = scores
    with timings.stage("report"):
        report = write_report(out, results, shortcut_rules(train_ex, test_ex), s, timings.data, reading)
    print(f"\n[demo] report: {report}")
    return report
