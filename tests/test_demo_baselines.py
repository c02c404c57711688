"""The demo's baselines on a tiny world: start from a stage-1 export, train only a projector, score per family."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fusion_vlm.demo import world
from fusion_vlm.demo.baselines import baseline_runs, run_baseline
from fusion_vlm.model import FusionVLM

SIZE = SimpleNamespace(micro_batch=2, lr=1e-2, n_values=(1, 4))
WORLD = world.WorldConfig(seed=0, max_local_views=1, questions=(2, 3), description_prob=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    world.export_llava(world.make_examples("train", 6, WORLD), root / "data", "train.jsonl")
    torch.manual_seed(0)
    stage1 = FusionVLM.from_config("tiny", overrides=["views.max_local_views=1", "fusion.max_queries=8"])
    stage1.save_pretrained(root / "stage1")  # a stage-1 export (the tiny random LLM is saved with it)
    return root, world.make_examples("test", 2, WORLD)


def test_baseline_runs_describe_each_mode():
    runs = {r.mode: r for r in baseline_runs([1, 4, 16])}
    assert list(runs) == ["all_tokens", "avgpool", "random"]
    assert runs["all_tokens"].eval_n == (16,) and runs["all_tokens"].train_n == () and not runs["all_tokens"].per_n
    assert runs["avgpool"].eval_n == runs["random"].train_n == (1, 4, 16)
    assert [r.reducer for r in runs.values()] == ["all", "avgpool", "random"]


@pytest.mark.parametrize("mode", ["all_tokens", "avgpool", "random"])
def test_baseline_trains_only_its_projector_and_scores_families(setup, mode):
    root, test_examples = setup
    run = {r.mode: r for r in baseline_runs(SIZE.n_values)}[mode]
    out = root / mode
    results = run_baseline(run, root / "stage1", out, root / "data", SIZE, steps=2, examples=test_examples)
    init, final, stage1 = (load_file(str(Path(d) / "model.safetensors")) for d in
                           (out / "init", out / "final", root / "stage1"))
    assert not any(k.startswith("fusion.") for k in final)
    assert not torch.equal(final["projector.proj.weight"], init["projector.proj.weight"])  # it trained
    assert not torch.equal(init["projector.proj.weight"], stage1["projector.proj.weight"])  # a fresh projector
    shared = [k for k in final if not k.startswith("projector.")]
    assert shared and all(torch.equal(final[k], stage1[k]) for k in shared)  # stage-1 vision, merge: unchanged
    llm_final, llm_stage1 = (load_file(str(Path(d) / "llm.safetensors")) for d in (out / "final", root / "stage1"))
    assert all(torch.equal(llm_final[k], llm_stage1[k]) for k in llm_stage1)  # the same frozen LLM
    assert list(results) == ([None] if mode == "all_tokens" else [1, 4])
    families = {qa.family for ex in test_examples for qa in ex.qas}
    for scores in results.values():
        assert set(scores) == families | {"all"}
        assert scores["all"]["n"] == sum(len(ex.qas) for ex in test_examples)
        assert all(0.0 <= s["accuracy"] <= 100.0 for s in scores.values())
    eval_files = sorted(p.name for p in (out / "eval").glob("*.json"))
    assert eval_files == ([f"{mode}.json"] if mode == "all_tokens" else [f"{mode}_n1.json", f"{mode}_n4.json"])
