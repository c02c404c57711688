"""The CPU demo end to end: world -> stage 0 -> stages 1-3 -> N-sweep -> evaluation -> report.

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
from dataclasses import dataclass
from pathlib import Path

from fusion_vlm.evaluation.settings import MODES  # vqq, vq_ft, vq (the paper's input modes)
from fusion_vlm.schema import from_dict, save_config

ELASTIC = "elastic"  # the stage-2 model (N drawn per micro-batch) run at every N, no stage-3 fine-tune


@dataclass(frozen=True)
class DemoSize:
    """How big a demo run is."""

    train_images: int  # images in the train split (each with the world's 8-10 questions)
    test_images: int  # images in the test split
    stage0: str  # stage-0 preset of fusion_vlm.demo.stage0 (quick | full)
    stage1_steps: int  # contrastive steps, N drawn from n_values per micro-batch
    stage2_steps: int  # generation steps, N drawn from n_values per micro-batch
    stage3_steps: int  # fine-tune steps per N and variant
    stage3_fraction: float  # seeded subset of the train split used by stage 3 (the paper's 10%)
    micro_batch: int  # samples per step
    lr: float  # peak learning rate of stages 1-3
    n_values: tuple[int, ...]  # the N sweep; N' = min(N, 8)


def demo_world(seed: int = 0):
    """The world the demo trains and tests on: the default world made easier to learn in CPU minutes.

    3 colours x 3 shapes with one held-out pair (red triangle: in the test split only, as often as any
    other pair), 1-3 large shapes and one glyph per image, 8-10 questions per image (the vision tokens of
    an image serve all of them, so more questions make a step more informative at little cost), aspect
    ratios up to 2:1 and HD-4 views (``views.max_local_views=4`` in MODEL_OVERRIDES). With one held-out
    pair per colour and per shape instead, each colour is seen with two shapes only, models learn shape
    through colour, and held-out shape accuracy falls below chance.
    Why each change: docs/demo.md, "Why each choice".
    """
    from fusion_vlm.demo.world import WorldConfig

    return WorldConfig(seed=seed, max_aspect=2.0, colours=("red", "green", "blue"),
                       shapes=("square", "circle", "triangle"),
                       heldout=(("red", "triangle"),), test_min_heldout=0,
                       n_shapes=(1, 3), n_glyphs=(1, 1), object_frac=(0.75, 0.95), max_local_views=4,
                       questions=(8, 10))


SIZES = {
    "quick": DemoSize(2000, 96, "quick", 400, 100, 20, 0.1, 8, 1e-3, (1, 4, 16)),
    "full": DemoSize(2000, 144, "full", 500, 250, 30, 0.1, 8, 1e-3, (1, 2, 4, 8, 16, 32, 64)),
}
# The tiny preset, widened a little so that a 2-core CPU can learn the world within the time budget; HD-4 views.
# Stage 1 with the stage-0 CLIP text tower frozen (the answers' embeddings act as fixed class prototypes)
# and identical answers as positives: the one stage-1 set-up whose features reached the LLM (docs/demo.md).
MODEL_OVERRIDES = ["views.max_local_views=4", "views.hd_rule=no_upsize", "fusion.hidden_size=96", "fusion.num_layers=3", "fusion.num_heads=4",
                   "fusion.num_kv_heads=4", "fusion.intermediate_size=192", "loss.freeze_text_encoder=true",
                   "loss.same_answer_positive=true"]

# lr multipliers per stage. Stage 1 grounds vision + fusion at the full lr; stages 2-3 then mostly train the
# projector, so that the grounding of stage 1 survives (docs/demo.md).
LR_SCALE = {"contrastive": {},
            "generation": {"vision": 0.01, "merge": 0.01, "fusion": 0.01, "projector": 3.0}}


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


def _train_config(stage: str, out: Path, data_dir: Path, size: DemoSize, steps: int, seed: int, **extra):
    from fusion_vlm.training.config import TrainConfig

    # Every stage asks each question of an image on its own (N slots after it; in stages 2-3 one LLM row per
    # question), as the evaluation asks them and as the stand-in LLM read them in stage 0, all from one vision
    # pass per image. With whole conversations, or one question per sample, stages 2-3 did not pass stage 1's
    # answers to the LLM, and a stage 1 fused as conversations (N slots, then N') left N = 1 untrained
    # (docs/demo.md, "Why each choice")
    data = {"files": [str(data_dir / "train.jsonl")], "image_root": str(data_dir), "shuffle": True,
            "independent_questions": True}
    data.update(extra.pop("data", {}))
    cfg = {
        "stage": stage, "output_dir": str(out), "seed": seed, "micro_batch_size": size.micro_batch,
        "grad_accum": 1, "max_steps": steps, "data": data,
        "optim": {"lr": size.lr, "warmup_ratio": 0.1 if stage == "contrastive" else 0.03,
                  "lr_scale": LR_SCALE[stage]},
        # stages 1-2 draw N from the sweep per micro-batch (one fusion for every N); stage 3 fixes it
        "n_queries_choices": [] if "n_queries" in extra else list(size.n_values),
        "engine": {"device": "cpu"},
        "checkpoint": {"every": 0, "keep_last": 1},
        "logging": {"wandb_mode": "disabled", "progress_bar": True},
        **extra,
    }
    train_cfg = from_dict(TrainConfig, cfg)
    train_cfg.validate()
    return train_cfg


def _train(stage: str, out: Path, data_dir: Path, size: DemoSize, steps: int, seed: int, **extra) -> Path:
    """Run one stage through the training entry point unless ``out/final`` exists; returns ``out/final``."""
    from fusion_vlm.training.loop import train

    final = out / "final"
    if (final / "model.safetensors").is_file():
        print(f"[demo] {out.name}: done earlier, skipped")
        return final
    train(_train_config(stage, out, data_dir, size, steps, seed, **extra))
    return final


def _context_probe(llm_dir: Path, examples) -> dict:
    """How well the frozen stage-0 LLM answers the test questions from each kind of text context
    ({kind: {family: accuracy %}}); cached in ``llm_dir/context_probe.json``."""
    from fusion_vlm.demo.text_llm import context_accuracy

    path = Path(llm_dir) / "context_probe.json"
    if not path.is_file():
        path.write_text(json.dumps(context_accuracy(llm_dir, examples), indent=2))
    return json.loads(path.read_text())


def run_demo(out_dir: str | Path = "demo_out", size: str = "full", seed: int = 0) -> Path:
    """Run (or resume) the whole demo in ``out_dir``; returns the path of ``report.md``."""
    import torch

    from fusion_vlm.demo import stage0, world
    from fusion_vlm.demo.evaluate import evaluate
    from fusion_vlm.demo.report import write_report
    from fusion_vlm.model import FusionVLM

    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {sorted(SIZES)}")
    s, out = SIZES[size], Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    data_dir = out / "data"
    wcfg = demo_world(seed)
    with timings.stage("world"):
        train_ex = world.make_examples("train", s.train_images, wcfg)
        test_ex = world.make_examples("test", s.test_images, wcfg)
        if not (data_dir / "train.jsonl").is_file():
            world.export_llava(train_ex, data_dir, "train.jsonl")
            world.export_llava(test_ex, data_dir, "test.jsonl")
    with timings.stage("stage0 (CLIP + text-only LLM stand-ins)"):
        pre = stage0.run_stage0(train_ex, out / "stage0", s.stage0, seed=seed, world=wcfg)
        reading = _context_probe(pre["llm_dir"], test_ex[:16])
    model_yaml = out / "model.yaml"
    n_max = max(s.n_values)
    save_config(stage0.demo_model_config(pre["clip_path"], pre["llm_dir"], n_queries=n_max,
                                         overrides=MODEL_OVERRIDES + [f"fusion.max_queries={max(n_max, 8)}"]),
                model_yaml)
    with timings.stage("stage1 contrastive"):
        s1 = _train("contrastive", out / "stage1", data_dir, s, s.stage1_steps, seed, model=str(model_yaml))
    with timings.stage("stage2 generation"):
        s2 = _train("generation", out / "stage2", data_dir, s, s.stage2_steps, seed, init_from=str(s1))
    finals = {}
    with timings.stage("stage3 N-sweep fine-tunes"):
        for n in s.n_values:
            for variant, use_q in (("vqq", True), ("vq_ft", False)):
                finals[(variant, n)] = _train(
                    "generation", out / "stage3" / f"{variant}_n{n}", data_dir, s, s.stage3_steps, seed,
                    init_from=str(s2), n_queries=n, use_question=use_q,
                    data={"fraction": s.stage3_fraction, "fraction_seed": seed})
    results = {}
    with timings.stage("evaluation"):
        for n in s.n_values:
            for mode in MODES:
                path = out / "eval" / f"{mode}_n{n}.json"
                if not path.is_file():
                    ckpt = finals[("vq_ft" if mode == "vq_ft" else "vqq", n)]
                    torch.manual_seed(seed)
                    model = FusionVLM.from_pretrained(ckpt)
                    scores = evaluate(model, test_ex, n, use_question=(mode == "vqq"))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(scores, indent=2))
                    print(f"[demo] N={n:<3} {mode:<6} " + "  ".join(
                        f"{f} {v['accuracy']:.1f}" for f, v in scores.items()), flush=True)
                results[(mode, n)] = json.loads(path.read_text())
        for n in s.n_values:  # one model for every N: stage 2 as trained, with the question, nested slots
            path = out / "eval" / f"{ELASTIC}_n{n}.json"
            if not path.is_file():
                torch.manual_seed(seed)
                scores = evaluate(FusionVLM.from_pretrained(s2), test_ex, n, use_question=True)
                path.write_text(json.dumps(scores, indent=2))
                print(f"[demo] N={n:<3} {ELASTIC:<7} " + "  ".join(
                    f"{f} {v['accuracy']:.1f}" for f, v in scores.items()), flush=True)
            results[(ELASTIC, n)] = json.loads(path.read_text())
    with timings.stage("report"):
        report = write_report(out, results, world.majority_baseline(train_ex, test_ex), s, timings.data, reading)
    print(f"\n[demo] report: {report}")
    return report
