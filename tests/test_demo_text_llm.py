"""Stage 0, language side: text contexts before questions, their tokenisation, fresh text-only scenes."""

from __future__ import annotations

import pytest
import torch

from fusion_vlm.demo import text_llm
from fusion_vlm.demo.world import WorldConfig, make_examples, make_text_example

from conftest import SMALL_LLM


@pytest.fixture(scope="module")
def examples():
    return make_examples("train", 24)


@pytest.fixture(scope="module")
def tok(examples, tmp_path_factory):
    return text_llm.train_tokenizer(examples, tmp_path_factory.mktemp("tok"))


@pytest.fixture
def seen_scenes(monkeypatch):
    """The text scenes that training packs into sequences (a spy on ``scene_prompt``), in order."""
    seen = []
    original = text_llm.scene_prompt

    def spy(tok, example, kind):
        seen.append(example)
        return original(tok, example, kind)

    monkeypatch.setattr(text_llm, "scene_prompt", spy)
    return seen


def test_context_kinds(examples):
    ex = examples[0]
    qa = ex.qas[0]
    assert text_llm.context_text(ex, qa, "none") == ""
    assert text_llm.context_text(ex, qa, "answer") == f" {qa.answer}\n"
    assert text_llm.context_text(ex, qa, "scene") == f" {ex.description}\n"
    assert text_llm.context_text(ex, qa, "evidence") == " " + (", ".join(qa.evidence) or "nothing") + "\n"
    with pytest.raises(ValueError, match="context kind 'caption'"):
        text_llm.context_text(ex, qa, "caption")


def test_answer_tokens_appear_in_the_evidence_context(examples, tok):
    """The leading space makes " red" in the context the same BPE token as the answer " red"."""
    checked = 0
    for ex in examples:
        for qa in ex.qas:
            if qa.family not in ("attribute", "reading"):
                continue
            prompt = text_llm.question_prompt(tok, ex, qa, "evidence")
            ids, labels = prompt.input_ids, prompt.labels
            turn_start = ids.index(tok.bos_token_id)  # the turn opens with <s>
            answer_at = next(k for k in range(turn_start, len(ids)) if labels[k] != -100)
            answer_end = next(k for k in range(answer_at, len(ids)) if ids[k] == tok.eos_token_id)
            answer_ids = ids[answer_at:answer_end]
            assert tok.decode(answer_ids).strip() == qa.answer
            context = ids[turn_start:answer_at]
            assert answer_ids[0] in context, (qa, tok.convert_ids_to_tokens(context))
            checked += 1
    assert checked >= 10


def test_fresh_scene_training_learns_and_is_deterministic(examples, tmp_path):
    world = WorldConfig()
    mix = {"evidence": 1.0, "scene": 1.0}
    runs = [text_llm.train_text_llm(examples, tmp_path / f"l{i}", steps=30, batch_size=8, lr=3e-3, seed=0,
                                    context_mix=mix, world=world, progress=False, **SMALL_LLM)
            for i in range(2)]
    losses = runs[0]["losses"]
    assert losses == runs[1]["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    # the scenes it trained on are text-only scenes, not the examples
    assert make_text_example(0, world).objects != examples[0].objects


def test_question_stream_walks_fresh_scenes_in_order():
    from itertools import islice

    world = WorldConfig()
    fresh = list(islice(text_llm._question_stream(world), 25))
    expected = [(i, qa) for i in range(10) for qa in make_text_example(i, world).qas][:25]
    assert [(ex.id, qa) for ex, qa in fresh] == [(f"text-{i:06d}", qa) for i, qa in expected]


def test_soft_texts_deal_the_scene_phrases_round_robin():
    from fusion_vlm.demo.world import Example, WorldObject

    objs = [WorldObject(region, "shape", (0, 0, 1, 1), shape="circle", colour=colour)
            for region, colour in [("bottom", "red"), ("top left", "blue"), ("centre", "green"), ("top", "pink")]]
    ex = Example("x", None, [], objs)
    # reading order: top left, top, centre, bottom
    p = ["blue circle top left", "pink circle top", "green circle centre", "red circle bottom"]
    assert text_llm.soft_texts(ex, 1) == [", ".join(p)]
    assert text_llm.soft_texts(ex, 2) == [f"{p[0]}, {p[2]}", f"{p[1]}, {p[3]}"]
    assert text_llm.soft_texts(ex, 3) == [f"{p[0]}, {p[3]}", p[1], p[2]]
    assert text_llm.soft_texts(ex, 6) == p + [", ".join(p)] * 2
    assert text_llm.soft_texts(Example("y", None, [], []), 2) == ["nothing", "nothing"]


def test_soft_prompt_positions_hold_mean_phrase_embeddings(examples, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    ex, qa = examples[0], examples[0].qas[0]
    soft = text_llm.question_prompt(tok, ex, qa, "soft", n_soft=3)
    plain = text_llm.question_prompt(tok, ex, qa, "none")
    assert sum(soft.fused_mask) == 3 and not any(plain.fused_mask)
    assert [t for t, m in zip(soft.input_ids, soft.fused_mask) if not m] == plain.input_ids
    texts = text_llm.soft_texts(ex, 3)
    ids = torch.tensor([soft.input_ids, soft.input_ids])
    x = text_llm.soft_embeds(model, tok, ids, [soft, soft], [texts, None])
    table = model.get_input_embeddings().weight
    pos = [i for i, m in enumerate(soft.fused_mask) if m]
    for j, text in enumerate(texts):
        want = table[tok(" " + text, add_special_tokens=False)["input_ids"]].mean(0)
        torch.testing.assert_close(x[0, pos[j]], want)
    keep = [i for i in range(len(soft.input_ids)) if i not in pos]
    torch.testing.assert_close(x[0, keep], table[ids[0, keep]])
    torch.testing.assert_close(x[1], table[ids[1]])  # no soft context: the plain embeddings
    with pytest.raises(ValueError, match="3 fused positions but 2 soft texts"):
        text_llm.soft_embeds(model, tok, ids[:1], [soft], [texts[:2]])
    with pytest.raises(ValueError, match="n_soft=0 with context kind 'soft'"):
        text_llm.question_prompt(tok, ex, qa, "soft")


def test_soft_contexts_are_for_the_probe_only(examples, tmp_path):
    with pytest.raises(ValueError, match="'soft' is read by the context probe only"):
        text_llm.train_text_llm(examples, tmp_path / "x", steps=1, context_mix={"soft": 1.0}, progress=False)


def test_answer_loss_covers_the_answer_and_its_closing_eos_only(examples, tok):
    """The labels of a training batch are the answer tokens and </s>; the prompt before them is unlabelled."""
    ex, qa = examples[0], examples[0].qas[0]
    prompts = [text_llm.question_prompt(tok, ex, qa, "scene"), text_llm.question_prompt(tok, ex, qa, "none")]
    ids, mask, labels = text_llm._llm_batch(prompts, tok.pad_token_id)
    for b, p in enumerate(prompts):
        kept = [t for t in labels[b].tolist() if t != -100]
        assert tok.decode(kept[:-1]).strip() == qa.answer and kept[-1] == tok.eos_token_id
        assert int(mask[b].sum()) == len(p.input_ids)
        gen = text_llm.question_prompt(tok, ex, qa, "scene" if b == 0 else "none", with_answer=False)
        first = next(k for k, t in enumerate(labels[b].tolist()) if t != -100)
        assert ids[b, :first].tolist() == gen.input_ids  # the training prefix is the generation prompt


def test_bad_context_mix_is_refused(examples, tmp_path):
    with pytest.raises(ValueError, match="context_mix"):
        text_llm.train_text_llm(examples, tmp_path / "x", steps=1, context_mix={"captions": 1.0}, progress=False)


def test_answer_weights_count_each_answer_once():
    import torch

    labels = torch.tensor([[-100, 5, 6, 2, -100, -100, 7, 2, -100],
                           [-100, -100, 9, -100, -100, -100, -100, -100, -100]])
    weights, n = text_llm.answer_weights(labels)
    assert n == 3
    third, half = 1 / 3, 1 / 2
    want = torch.tensor([[0, third, third, third, 0, 0, half, half, 0], [0, 0, 1, 0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(weights, want.float())


def test_text_llm_loss_matches_hugging_face_per_answer_and_per_token(examples, tok):
    """Answer term: the mean of Hugging Face's loss over each question's answer; text term: Hugging Face's
    loss with every real token labelled, answers included."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2)).eval()
    described = next((ex, qa) for ex in examples for qa in ex.qas if qa.family == "description")
    items = [(ex, qa) for ex in examples[:3] for qa in ex.qas[:2]][:5] + [described]  # answers of unequal length
    prompts = [text_llm.question_prompt(tok, ex, qa, kind) for (ex, qa), kind in zip(items, ["scene", "none"] * 3)]
    ids, mask, labels = text_llm._llm_batch(prompts, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_row = [model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], labels=labels[b:b + 1]).loss
                   for b in range(len(prompts))]
        text_labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        text = model(input_ids=ids, attention_mask=mask, labels=text_labels).loss
        answer = text_llm.text_llm_loss(logits, ids, mask, labels)
        both = text_llm.text_llm_loss(logits, ids, mask, labels, text_weight=0.5)
        pooled = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # long answers weigh more here
    torch.testing.assert_close(answer, torch.stack(per_row).mean())
    torch.testing.assert_close(both, answer + 0.5 * text)
    assert abs(float(pooled - answer)) > 1e-3


def test_scene_prompt_packs_every_question_after_one_scene_context(examples, tok):
    import torch

    ex = next(e for e in examples if len(e.qas) >= 3)
    packed = text_llm.scene_prompt(tok, ex, "scene")
    text = tok.decode(packed.input_ids)
    assert text.count(ex.description) == 1 and text.index(ex.description) < text.index(ex.qas[0].question)
    assert [q.question in text for q in ex.qas] == [True] * len(ex.qas)
    labels = torch.tensor([packed.labels])
    _, n = text_llm.answer_weights(labels)
    assert n == len(ex.qas)
    # the first turn is exactly the one-question prompt of the first question
    one = text_llm.question_prompt(tok, ex, ex.qas[0], "scene")
    assert packed.input_ids[:len(one.input_ids)] == one.input_ids and packed.labels[:len(one.labels)] == one.labels
    kept = [t for t in labels[0].tolist() if t != -100]
    assert kept.count(tok.eos_token_id) == len(ex.qas)
    answers = text_llm.scene_prompt(tok, ex, "answer")
    assert tok.decode(answers.input_ids).count(f" {ex.qas[-1].answer}\n{ex.qas[-1].question}") == 1


def test_packed_training_with_the_text_loss_learns_and_is_deterministic(examples, tmp_path):
    world = WorldConfig()
    runs = [text_llm.train_text_llm(examples, tmp_path / f"p{i}", steps=20, batch_size=4, lr=3e-3, seed=0,
                                    context_mix={"scene": 1.0, "answer": 1.0}, world=world, pack=True,
                                    text_weight=1.0, progress=False, **SMALL_LLM)
            for i in range(2)]
    losses = runs[0]["losses"]
    assert losses == runs[1]["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


@pytest.mark.parametrize("describe", [1.0, 0.0])
def test_describe_sets_how_often_a_text_scene_is_described(examples, tmp_path, seen_scenes, describe):
    """``describe`` replaces the world's description_prob for the text scenes: every scene asks for its
    description at 1.0, none at 0.0 (the world's own is 0.25); the stored recipe records it."""
    import json

    text_llm.train_text_llm(examples, tmp_path / "d", steps=2, batch_size=6, seed=0, context_mix={"scene": 1.0},
                            world=WorldConfig(), pack=True, describe=describe, progress=False, **SMALL_LLM)
    described = [any(qa.family == "description" for qa in ex.qas) for ex in seen_scenes]
    assert len(described) == 12 and described == [describe == 1.0] * 12
    stored = json.loads((tmp_path / "d" / text_llm.LOSSES_FILE).read_text())
    assert stored["description_prob"] == describe


def test_bad_describe_is_refused(examples, tmp_path):
    with pytest.raises(ValueError, match="describe=1.5"):
        text_llm.train_text_llm(examples, tmp_path / "x", steps=1, describe=1.5, progress=False)


def test_init_continues_from_the_float16_rounding_of_a_trained_llm(examples, tmp_path):
    """``init`` starts from a trained LLM's weights rounded to float16 and keeps its tokenizer: with lr 0
    nothing moves, so the saved model is exactly that rounding."""
    import json

    from safetensors.torch import load_file

    kw = dict(steps=3, batch_size=4, context_mix={"scene": 1.0}, world=WorldConfig(), pack=True, progress=False)
    text_llm.train_text_llm(examples, tmp_path / "a", lr=3e-3, **kw, **SMALL_LLM)
    text_llm.train_text_llm([], tmp_path / "b", lr=0.0, init=tmp_path / "a", first_scene=12, **kw)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].half().float(), b[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the rounding did happen (a is float32)
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
    stored = json.loads((tmp_path / "b" / text_llm.LOSSES_FILE).read_text())
    assert stored["init"] is True and stored["first_scene"] == 12 and stored["lr"] == 0.0


def test_families_and_first_scene_choose_the_text_scenes(examples, tmp_path, seen_scenes):
    """``families`` replaces the world's question families and the scenes start at ``first_scene``."""
    text_llm.train_text_llm(examples, tmp_path / "f", steps=2, batch_size=3, seed=0, context_mix={"scene": 1.0},
                            world=WorldConfig(), pack=True, describe=0.0, families=("existence",), first_scene=5,
                            progress=False, **SMALL_LLM)
    assert [ex.id for ex in seen_scenes] == [f"text-{i:06d}" for i in range(5, 11)]
    assert {qa.family for ex in seen_scenes for qa in ex.qas} == {"existence"}
    assert [qa.question for qa in seen_scenes[0].qas] != [qa.question for qa in make_text_example(5, WorldConfig()).qas]


@pytest.mark.parametrize("bad, match", [({"families": ("colour",)}, "families=\\('colour',\\)"),
                                        ({"families": ()}, "families=\\(\\)"),
                                        ({"init": "nowhere"}, "init='nowhere': not an LLM directory"),
                                        ({"first_scene": -1}, "first_scene=-1")])
def test_bad_phase_arguments_are_refused(examples, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        text_llm.train_text_llm(examples, tmp_path / "x", steps=1, progress=False, **bad)
