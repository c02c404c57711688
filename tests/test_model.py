"""FusionVLM end to end on the tiny preset: losses vs Hugging Face, stages, generate, save/load."""

import pytest
import torch

from fusion_vlm.model import FusionVLM
from fusion_vlm.processor import collate


@pytest.fixture(scope="module")
def batch(tiny_model, image_factory):
    make_image = image_factory
    p = tiny_model.processor
    s1 = p.build(make_image(300, 200, 1), [("What colour is the square?", "red"), ("How many?", "three")],
                 with_answers_for_contrastive=True)
    s2 = p.build(make_image(120, 500, 2), [("Describe the image.", "a blue circle and a red square")],
                 with_answers_for_contrastive=True)
    return collate([s1, s2], tiny_model.tokenizer.pad_token_id)


def test_batch_shapes(tiny_model, batch):
    assert batch.views_per_sample[0] != batch.views_per_sample[1]  # different view counts collate
    assert batch.fused_mask.sum(1).tolist() == [8 + 8, 8]  # N for q1, N' = min(8, 8) for q2
    assert batch.answer_tokens.shape == (3, 64)


def test_generation_loss_equals_hf_loss(tiny_model, batch):
    with torch.no_grad():
        ours = tiny_model(batch, "generation")["loss"]
        embeds = tiny_model.llm_embeddings(batch, tiny_model.fuse(batch))
        ref = tiny_model.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss
    torch.testing.assert_close(ours, ref)


def test_contrastive_stage_losses(tiny_model, batch):
    with torch.no_grad():
        out = tiny_model(batch, "contrastive")
    assert set(out) == {"loss", "contrastive", "identity"}
    torch.testing.assert_close(out["loss"], out["contrastive"] + out["identity"])
    assert out["contrastive"] > 0 and 0 <= out["identity"] < 1


def test_contrastive_stage_treats_identical_answers_as_positives(tiny_model, image_factory):
    """Two "red" answers: with same_answer_positive the loss uses the multi-positive form (checked by
    recomputing it from the parts), and with it off it is plain CLIP InfoNCE."""
    from fusion_vlm.losses import contrastive_loss

    p = tiny_model.processor
    s1 = p.build(image_factory(300, 200, 1), [("What colour is the square?", "red"), ("How many?", "three")],
                 with_answers_for_contrastive=True)
    s2 = p.build(image_factory(200, 300, 2), [("What colour is the circle?", "red")], with_answers_for_contrastive=True)
    b = collate([s1, s2], tiny_model.tokenizer.pad_token_id)
    flag = tiny_model.config.loss.same_answer_positive
    try:
        with torch.no_grad():
            eos = tiny_model.contrastive_head(tiny_model.fuse(b).eos())
            text = tiny_model.text_encoder.encode_text(b.answer_tokens)
            same = torch.tensor([[False, False, True], [False, False, False], [True, False, False]])
            multi = contrastive_loss(eos, text, tiny_model.logit_scale, same)
            plain = contrastive_loss(eos, text, tiny_model.logit_scale)
            tiny_model.config.loss.same_answer_positive = True
            torch.testing.assert_close(tiny_model(b, "contrastive")["contrastive"], multi)
            tiny_model.config.loss.same_answer_positive = False
            torch.testing.assert_close(tiny_model(b, "contrastive")["contrastive"], plain)
    finally:
        tiny_model.config.loss.same_answer_positive = flag
    assert multi < plain


def test_stage_parameters_exclude_the_llm():
    torch.manual_seed(0)
    model = FusionVLM.from_config("tiny")
    llm_ids = {id(p) for p in model.llm.parameters()}
    for stage in ("contrastive", "generation"):
        params = model.set_stage(stage)
        assert params and not llm_ids & {id(p) for p in params}
        assert not any(p.requires_grad for p in model.llm.parameters())
    gen_ids = {id(p) for p in model.set_stage("generation")}
    assert {id(p) for p in model.projector.parameters()} <= gen_ids
    assert not {id(p) for p in model.text_encoder.parameters()} & gen_ids
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    assert text_ids <= {id(p) for p in model.set_stage("contrastive")}
    model.config.loss.freeze_text_encoder = True  # the option keeps the CLIP text tower out of stage 1
    stage1 = {id(p) for p in model.set_stage("contrastive")}
    assert not text_ids & stage1 and {id(p) for p in model.contrastive_head.parameters()} <= stage1
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    model.train()
    assert model.fusion.training and not model.llm.training


def test_generation_backward_reaches_vision_not_llm(batch):
    torch.manual_seed(0)
    model = FusionVLM.from_config("tiny")
    model.set_stage("generation")
    model(batch, "generation")["loss"].backward()
    assert model.vision.visual.conv1.weight.grad is not None
    assert model.projector.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())


def test_generate_cache_equals_no_cache_and_batching(tiny_model, image_factory):
    images = [image_factory(400, 300, 3), image_factory(90, 700, 4)]
    questions = [["What is in the top left?", "How many circles?"], ["Describe the image."]]
    with_cache = tiny_model.generate(images, questions, max_new_tokens=6, use_cache=True)
    no_cache = tiny_model.generate(images, questions, max_new_tokens=6, use_cache=False)
    assert with_cache == no_cache
    assert [len(a) for a in with_cache] == [2, 1]
    alone = tiny_model.generate(images[1:], questions[1:], max_new_tokens=6)
    assert alone[0] == with_cache[1]


def test_save_load_identical_outputs(tiny_model, batch, tmp_path, image_factory):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "ckpt" / "llm.safetensors").is_file()
    loaded = FusionVLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch, "generation")["loss"], tiny_model(batch, "generation")["loss"])
    img = [image_factory(200, 200, 5)]
    assert loaded.generate(img, [["Q?"]], max_new_tokens=5) == tiny_model.generate(img, [["Q?"]], max_new_tokens=5)
    changed = FusionVLM.from_pretrained(tmp_path / "ckpt", overrides=["fusion.n_queries=2"])
    assert changed.config.fusion.n_queries == 2 and changed.config.fusion.later == 2


def test_from_pretrained_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a FusionVLM checkpoint"):
        FusionVLM.from_pretrained(tmp_path)


def test_mismatched_fused_count_is_loud(tiny_model, batch):
    bad = collate([tiny_model.processor.build(batch.pixel_values[:batch.views_per_sample[0]], [("q", "a")])])
    bad.n_queries, bad.n_queries_later = 3, 3
    with pytest.raises(ValueError, match="fusion module produced 3 tokens"):
        tiny_model(bad, "generation")


def test_vision_prefix_reuse_gives_identical_answers(tiny_model, image_factory):
    images = [image_factory(500, 260, 6), image_factory(200, 200, 7)]
    questions = [["What is left?", "Is there a red star?", "Count the circles."], ["Describe the image."]]
    tiny_model.prefix_cache.clear()
    reused = tiny_model.generate(images, questions, max_new_tokens=6, conversation=False)
    assert len(tiny_model.prefix_cache) == 2  # one prefix per image, shared by its questions
    fresh = tiny_model.generate(images, questions, max_new_tokens=6, conversation=False,
                                reuse_vision_prefix=False)
    assert reused == fresh and [len(a) for a in reused] == [3, 1]


def test_prefix_cache_computes_only_the_missing_images_in_one_call():
    from fusion_vlm.fusion import VisionPrefix
    from fusion_vlm.generation import VisionPrefixCache
    views = [torch.full((2, 3, 4, 4), float(i)) for i in range(4)]
    calls = []

    def compute(batch):  # prefixes as views into one batched tensor, as FusionModule.encode_prefixes gives
        ids = [int(v[0, 0, 0, 0]) for v in batch]
        calls.append(ids)
        kv = torch.tensor(ids, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 1, 3, 2).contiguous()
        return [VisionPrefix([(kv[b:b + 1], kv[b:b + 1])], 3) for b in range(len(ids))]

    def ids(prefixes):
        return [int(p.kv[0][0][0, 0, 0, 0]) for p in prefixes]

    cache = VisionPrefixCache(size=3)
    with torch.no_grad():
        assert ids(cache.get(views[:2], compute)) == [0, 1]
        assert ids(cache.get([views[1], views[2], views[0]], compute)) == [1, 2, 0]
        assert calls == [[0, 1], [2]]  # image 2 alone was missing
        stored = cache.get([views[0]], compute)[0].kv[0][0]
        assert stored.untyped_storage().nbytes() == stored.numel() * 4  # a copy, not a view of the batch
        cache.get([views[3]], compute)  # a fourth image evicts the least recently used (image 1)
        cache.get([views[0], views[1]], compute)
    assert calls[-1] == [1] and len(cache) == 3
    grad_cache = VisionPrefixCache(size=3)
    with torch.enable_grad():  # prefixes built under autograd hold a graph: not stored
        grad_cache.get([views[0]], compute)
    assert len(grad_cache) == 0


def test_fuse_with_prefix_equals_full_sequence(tiny_model, image_factory):
    pixels = tiny_model.processor.pixel_values(image_factory(300, 300, 8))
    qt = tiny_model.processor.question_tokenizer
    ids = [qt("what colour is the top left shape"), qt("how many"), qt("")]
    with torch.no_grad():
        vision = tiny_model.encode_images(pixels, [pixels.shape[0]])
        prefix = tiny_model.fusion.encode_prefix(vision[0])
        reused = tiny_model.fusion.fuse_with_prefix(prefix, ids, 5)
        for q, got in zip(ids, reused):
            full = tiny_model.fusion(vision, [[q]], 5, 5).groups[0][0]
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
