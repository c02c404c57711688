"""Stage 0, language side: text contexts before questions, their tokenisation, fresh text-only scenes."""

from __future__ import annotations

import pytest

from fusion_vlm.demo import text_llm
from fusion_vlm.demo.world import WorldConfig, make_examples, make_text_example

from conftest import SMALL_LLM


@pytest.fixture(scope="module")
def examples():
    return make_examples("train", 24)


@pytest.fixture(scope="module")
def tok(examples, tmp_path_factory):
    return text_llm.train_tokenizer(examples, tmp_path_factory.mktemp("tok"))


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
        for i, qa in enumerate(ex.qas):
            if qa.family not in ("attribute", "reading"):
                continue
            kinds = ["none"] * len(ex.qas)
            kinds[i] = "evidence"
            prompt = text_llm.chat(tok, ex, kinds)
            ids, labels = prompt.input_ids, prompt.labels
            turn_start = [k for k, t in enumerate(ids) if t == tok.bos_token_id][i]  # each turn opens with <s>
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
                                    context_mix=mix, fresh_scenes=world, progress=False, **SMALL_LLM)
            for i in range(2)]
    losses = runs[0]["losses"]
    assert losses == runs[1]["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    # the scenes it trained on are text-only scenes, not the examples
    assert make_text_example(0, world).objects != examples[0].objects


def test_question_stream_walks_fresh_scenes_in_order_and_examples_in_epochs(examples):
    from itertools import islice

    world = WorldConfig()
    fresh = list(islice(text_llm._question_stream(examples, world, seed=0), 25))
    expected = [(i, qa) for i in range(10) for qa in make_text_example(i, world).qas][:25]
    assert [(ex.id, qa) for ex, qa in fresh] == [(f"text-{i:06d}", qa) for i, qa in expected]
    pairs = [(ex.id, qa.question) for ex in examples[:3] for qa in ex.qas]
    epochs = [(ex.id, qa.question) for ex, qa in islice(text_llm._question_stream(examples[:3], None, 0),
                                                         2 * len(pairs))]
    assert sorted(epochs[:len(pairs)]) == sorted(pairs) == sorted(epochs[len(pairs):])
    assert epochs[:len(pairs)] != pairs  # shuffled


def test_per_question_answer_loss_learns_and_is_deterministic(examples, tmp_path):
    kw = dict(steps=30, batch_size=16, lr=3e-3, seed=0, context_mix={"scene": 0.7, "answer": 0.3},
              fresh_scenes=WorldConfig(), per_question=True, loss_on="answers", progress=False, **SMALL_LLM)
    runs = [text_llm.train_text_llm(examples, tmp_path / f"q{i}", **kw) for i in range(2)]
    losses = runs[0]["losses"]
    assert losses == runs[1]["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


def test_bad_context_mix_is_refused(examples, tmp_path):
    with pytest.raises(ValueError, match="context_mix"):
        text_llm.train_text_llm(examples, tmp_path / "x", steps=1, context_mix={"captions": 1.0}, progress=False)
