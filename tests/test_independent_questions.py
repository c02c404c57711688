"""Independent questions: every question of an image is its own LLM row with N slots, from one vision pass.

The reference is the plain path: the same questions as one-question samples (one image copy each), fused
as ``[vision][q][N slots]`` sequences and collated as conversations. Losses and gradients must agree.
"""

from __future__ import annotations

import pytest
import torch

from fusion_vlm.fusion import FusionModule
from fusion_vlm.language import build_prompt
from fusion_vlm.model import FusionVLM
from fusion_vlm.processor import collate

TURNS = [[("What colour is the square?", "red"), ("How many shapes?", "three"), ("Is there a circle?", "no")],
         [("Describe the image.", "a blue circle")]]


def _batches(model, images, n):
    p, pad = model.processor, model.tokenizer.pad_token_id
    rows = collate([p.build(img, turns, n, independent=True) for img, turns in zip(images, TURNS)], pad)
    split = collate([p.build(img, [turn], n) for img, turns in zip(images, TURNS) for turn in turns], pad)
    return rows, split


def test_independent_sample_has_one_prompt_per_question(tiny_model, image_factory):
    p = tiny_model.processor
    s = p.build(image_factory(300, 200, 1), TURNS[0], n_queries=5, independent=True)
    assert s.input_ids.shape[0] == 3 and (s.n_queries, s.n_queries_later) == (5, 5)
    assert s.fused_mask.sum(dim=1).tolist() == [5, 5, 5]
    for r, turn in enumerate(TURNS[0]):
        want = build_prompt(tiny_model.tokenizer, [turn], [5], tiny_model.config.llm.system_prompt)
        n = int(s.attention_mask[r].sum())
        assert s.input_ids[r, :n].tolist() == want.input_ids and s.labels[r, :n].tolist() == want.labels
        assert s.fused_mask[r, :n].tolist() == want.fused_mask and not s.fused_mask[r, n:].any()
    conv = p.build(image_factory(300, 200, 1), TURNS[0], n_queries=5)
    assert conv.input_ids.shape[0] == 1 and int(conv.fused_mask.sum()) == 5 + 2 * min(5, conv.n_queries_later)
    with pytest.raises(ValueError, match="independent"):
        collate([s, conv])


@pytest.mark.parametrize("n", [1, 4])
def test_rows_give_the_loss_and_gradients_of_one_question_samples(image_factory, n):
    torch.manual_seed(0)
    model = FusionVLM.from_config("tiny")
    params = dict(model.named_parameters())
    model.set_stage("generation")
    images = [image_factory(300, 200, 3), image_factory(120, 400, 4)]
    rows, split = _batches(model, images, n)
    assert rows.input_ids.shape[0] == split.input_ids.shape[0] == 4 and len(rows.views_per_sample) == 2
    torch.testing.assert_close(rows.input_ids, split.input_ids)
    grads = []
    for batch in (rows, split):
        model.zero_grad()
        loss = model(batch, "generation")["loss"]
        loss.backward()
        grads.append((loss.detach(), {k: v.grad.clone() for k, v in params.items() if v.grad is not None}))
    (loss_rows, g_rows), (loss_split, g_split) = grads
    torch.testing.assert_close(loss_rows, loss_split, atol=1e-5, rtol=1e-5)
    assert g_rows.keys() == g_split.keys() and any(k.startswith("vision.") for k in g_rows)
    for k in g_rows:
        torch.testing.assert_close(g_rows[k], g_split[k], atol=1e-5, rtol=1e-4, msg=k)


def test_independent_groups_do_not_see_each_other(tiny_model, image_factory):
    """Changing question 2 changes its own fused tokens only; in a conversation it also moves question 3."""
    pixels = tiny_model.processor.pixel_values(image_factory(200, 200, 5))
    qt = tiny_model.processor.question_tokenizer
    a = [qt("what colour"), qt("how many"), qt("is there a circle")]
    b = [a[0], qt("what letter is written"), a[2]]
    with torch.no_grad():
        vision = tiny_model.encode_images(pixels, [pixels.shape[0]])
        ind = [tiny_model.fusion(vision, [q], 3, independent=True).groups[0] for q in (a, b)]
        conv = [tiny_model.fusion(vision, [q], 3, 3).groups[0] for q in (a, b)]
    torch.testing.assert_close(ind[0][0], ind[1][0])
    torch.testing.assert_close(ind[0][2], ind[1][2])
    assert not torch.allclose(ind[0][1], ind[1][1], atol=1e-4)
    assert not torch.allclose(conv[0][2], conv[1][2], atol=1e-4)


def test_gradient_checkpointing_falls_back_to_full_sequences(tiny_model, image_factory):
    fusion = FusionModule(tiny_model.config.fusion)
    fusion.load_state_dict(tiny_model.fusion.state_dict())
    qt = tiny_model.processor.question_tokenizer
    pixels = tiny_model.processor.pixel_values(image_factory(300, 150, 6))
    with torch.no_grad():
        vision = tiny_model.encode_images(pixels, [pixels.shape[0]])
    vision = [vision[0], vision[0][:20]]
    questions = [[qt("what colour"), qt("how many")], [qt("describe")]]
    fusion.train()
    prefix = fusion(vision, questions, 4, independent=True).groups
    fusion.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    full = fusion(vision, questions, 4, independent=True).groups
    assert [len(g) for g in full] == [2, 1] and full[0][0].shape == (4, tiny_model.config.fusion.hidden_size)
    for p_groups, f_groups in zip(prefix, full):
        for p, f in zip(p_groups, f_groups):
            torch.testing.assert_close(p, f, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_question", [True, False])
def test_batched_independent_fusion_equals_one_prefix_per_image(tiny_model, image_factory, use_question):
    """The batch path (all vision prefixes right-padded in one call, all questions in a second) gives each
    group what :meth:`fuse_with_prefix` gives it from its own image's prefix, for vision of unequal lengths."""
    qt = tiny_model.processor.question_tokenizer
    pixels = tiny_model.processor.pixel_values(image_factory(300, 150, 7))
    fusion = tiny_model.fusion.eval()
    with torch.no_grad():
        v = tiny_model.encode_images(pixels, [pixels.shape[0]])[0]
        vision = [v[:30], v, v[5:17]]
        questions = [[qt("what colour"), qt("how many shapes are there")], [qt("describe")],
                     [qt("is there a red circle"), qt("what letter"), qt("how many")]]
        batched = fusion(vision, questions, 3, use_question=use_question, independent=True).groups
        alone = [fusion.fuse_with_prefix(fusion.encode_prefix(x), qs, 3, use_question)
                 for x, qs in zip(vision, questions)]
    assert [len(g) for g in batched] == [2, 1, 3]
    for b_groups, a_groups in zip(batched, alone):
        for b, a in zip(b_groups, a_groups):
            assert b.shape == (3, fusion.cfg.hidden_size)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # the groups of the short image really read their own (padded) prefix: not the long one's
    assert not torch.allclose(batched[0][0], fusion.fuse_with_prefix(fusion.encode_prefix(v), questions[0][:1], 3,
                                                                     use_question)[0], atol=1e-4)
