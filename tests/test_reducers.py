"""Baseline reducers (all merged tokens, average pooling to N, N random tokens) in front of the frozen LLM."""

import pytest
import torch

from fusion_vlm.config import ModelConfig, load_model_config
from fusion_vlm.errors import CheckpointError, ConfigError
from fusion_vlm.model import FusionVLM
from fusion_vlm.processor import collate
from fusion_vlm.reducers import avg_pool, group_counts, image_seed, random_pick, reduce_batch

PER_VIEW = 4 * 4 + 1  # tiny preset: 112-px views of 14-px patches -> 8x8 -> merged 4x4, + 1 newline token


def _model(reducer: str) -> FusionVLM:
    torch.manual_seed(0)
    return FusionVLM.from_config("tiny", overrides=[f"reducer={reducer}"]).eval()


@pytest.fixture(scope="module")
def models():
    return {r: _model(r) for r in ("all", "avgpool", "random")}


def _batch(model, image_factory, independent=False):
    p = model.processor
    s1 = p.build(image_factory(300, 200, 1), [("What colour is the square?", "red"), ("How many?", "three")],
                 independent=independent)
    s2 = p.build(image_factory(120, 500, 2), [("Describe the image.", "a blue circle")], independent=independent)
    return collate([s1, s2], model.tokenizer.pad_token_id)


def test_avgpool_equals_hand_computed_means():
    x = torch.tensor([[0., 10.], [1., 11.], [2., 12.], [3., 13.], [4., 14.]])  # T = 5 tokens, H = 2
    # N = 2: torch's adaptive bins are tokens 0..2 and 2..4 (start floor(i T / N), end ceil((i + 1) T / N))
    torch.testing.assert_close(avg_pool(x, 2), torch.tensor([[1., 11.], [3., 13.]]))
    torch.testing.assert_close(avg_pool(x, 1), torch.tensor([[2., 12.]]))
    torch.testing.assert_close(avg_pool(x, 5), x)
    torch.testing.assert_close(avg_pool(x, 9), x)  # N > T: all T tokens
    assert group_counts("avgpool", 5, 3, 9, 2) == [5, 2, 2]


def test_random_picks_distinct_tokens_in_order_deterministic_per_image():
    t, n = 60, 12
    x = torch.arange(t, dtype=torch.float32)[:, None].repeat(1, 3)  # token i holds the value i
    eval_a = reduce_batch("random", [x], [2], n, 4, seeds=[123]).groups[0]
    picked = eval_a[0][:, 0]
    assert picked.shape == (n,) and len(set(picked.tolist())) == n
    assert torch.all(picked[1:] > picked[:-1])  # original order kept
    assert set(eval_a[1][:, 0].tolist()) <= set(picked.tolist())  # N' tokens: a subset of the image's N
    eval_b = reduce_batch("random", [x], [2], n, 4, seeds=[123]).groups[0]
    assert torch.equal(eval_a[0], eval_b[0]) and torch.equal(eval_a[1], eval_b[1])
    other = reduce_batch("random", [x], [1], n, 4, seeds=[124]).groups[0][0]
    assert not torch.equal(other, eval_a[0])
    torch.manual_seed(0)
    steps = [reduce_batch("random", [x], [1], n, n).groups[0][0][:, 0] for _ in range(3)]
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(steps[1], steps[2])
    assert all(len(set(s.tolist())) == n and torch.all(s[1:] > s[:-1]) for s in steps)
    assert torch.equal(random_pick(x, 99)[:, 0], torch.arange(t, dtype=torch.float32))  # N > T: all, in order


def test_image_seed_depends_on_content_only():
    a = torch.rand(3, 3, 8, 8)
    assert image_seed(a) == image_seed(a.clone()) and image_seed(a) != image_seed(a + 1)


def test_all_passes_every_merged_token(models, image_factory):
    model = models["all"]
    batch = _batch(model, image_factory)
    v0, v1 = batch.views_per_sample
    # every user turn opens with all views x (4x4 + newline) merged tokens of its image
    assert batch.fused_mask.sum(1).tolist() == [2 * v0 * PER_VIEW, v1 * PER_VIEW]
    with torch.no_grad():
        vision = model.encode_images(batch.pixel_values, batch.views_per_sample)
        out = model.fuse(batch)
    assert [v.shape[0] for v in vision] == [v0 * PER_VIEW, v1 * PER_VIEW]
    assert torch.equal(out.groups[0][0], vision[0]) and torch.equal(out.groups[0][1], vision[0])
    assert torch.equal(out.groups[1][0], vision[1])


@pytest.mark.parametrize("reducer", ["all", "avgpool", "random"])
def test_baseline_trains_only_its_projector(models, image_factory, reducer):
    model = _model(reducer)
    assert model.fusion is None
    params = model.set_stage("generation")
    assert {id(p) for p in params} == {id(p) for p in model.projector.parameters()}
    model.train()
    batch = _batch(model, image_factory)
    loss = model(batch, "generation")["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert model.projector.proj.weight.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["projector.proj.weight"]
    with pytest.raises(ConfigError, match="contrastive stage"):
        model.set_stage("contrastive")
    with pytest.raises(ConfigError, match="contrastive stage"):
        model(batch, "contrastive")


def test_counts_follow_n_and_later(models, image_factory):
    for reducer in ("avgpool", "random"):
        batch = _batch(models[reducer], image_factory)
        assert batch.fused_mask.sum(1).tolist() == [8 + 8, 8]  # N = 8, N' = min(8, 8), as with the fusion
        ind = _batch(models[reducer], image_factory, independent=True)
        assert ind.fused_mask.sum(1).tolist() == [8, 8, 8]
        with torch.no_grad():
            out = models[reducer].fuse(ind)
        assert [g.shape[0] for g in out.per_group()] == [8, 8, 8]


def test_random_model_is_deterministic_at_eval_and_fresh_in_training(models, image_factory):
    model = models["random"]
    batch = _batch(model, image_factory)
    with torch.no_grad():
        first, again = model.fuse(batch), model.fuse(batch)
        alone = model.fuse(collate([model.processor.build(batch.pixel_values[batch.views_per_sample[0]:],
                                                          [("Describe the image.", "a blue circle")])]))
    assert torch.equal(first.groups[0][0], again.groups[0][0])
    assert torch.equal(first.groups[1][0], alone.groups[0][0])  # same image, other batch: same tokens
    model.train()
    try:
        with torch.no_grad():
            a, b = model.fuse(batch), model.fuse(batch)
    finally:
        model.eval()
    assert not torch.equal(a.groups[0][0], b.groups[0][0])


@pytest.mark.parametrize("reducer", ["all", "avgpool", "random"])
def test_generate_and_save_load_round_trip(models, image_factory, tmp_path, reducer):
    model = models[reducer]
    images = [image_factory(400, 300, 3), image_factory(90, 300, 4)]
    questions = [["What is in the top left?", "How many circles?"], ["Describe the image."]]
    conv = model.generate(images, questions, max_new_tokens=4)
    ind = model.generate(images, questions, max_new_tokens=4, conversation=False)
    assert [len(a) for a in conv] == [2, 1] and [len(a) for a in ind] == [2, 1]
    assert conv[1] == ind[1]  # a single question: conversation and independent prompts agree
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FusionVLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.reducer == reducer and loaded.fusion is None
    batch = _batch(model, image_factory)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch, "generation")["loss"], model(batch, "generation")["loss"])
    assert loaded.generate(images, questions, max_new_tokens=4, conversation=False) == ind
    with pytest.raises(CheckpointError, match="missing fusion"):  # strict keys: no fusion weights to load
        FusionVLM.from_pretrained(tmp_path / "ckpt", overrides=["reducer=fusion"])


def test_default_is_fusion_and_bad_reducer_is_refused():
    assert ModelConfig().reducer == "fusion"
    with pytest.raises(ConfigError, match="reducer"):
        load_model_config("tiny", ["reducer=maxpool"])
