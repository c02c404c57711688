"""LLaVA records -> samples: validation with skip reasons, subsets, collation, resumable order."""

from __future__ import annotations

import json

import pytest

from fusion_vlm.training.batches import Collator, MicroBatch, ResumableBatchSampler, SampleDataset, Skipped
from fusion_vlm.training.data import (SkipCounter, SkipSample, TooManySkipped, load_llava, parse_record,
                                      read_records, subset_indices)
from conftest import make_image


def conv(*pairs, first_tag=True):
    out = []
    for i, (q, a) in enumerate(pairs):
        out.append({"from": "human", "value": ("<image>\n" + q) if i == 0 and first_tag else q})
        if a is not None:
            out.append({"from": "gpt", "value": a})
    return out


def test_parse_record_strips_image_tag_and_caps_questions():
    rec = {"id": "a", "image": "x/1.jpg", "conversations": conv(("Q1?", "A1"), ("Q2?", "A2"), ("Q3?", "A3"))}
    out = parse_record(rec, "/root", max_questions=2)
    assert out == {"id": "a", "image": "/root/x/1.jpg", "questions": ["Q1?", "Q2?"], "answers": ["A1", "A2"]}
    assert parse_record({**rec, "image": "/abs/1.jpg"}, "/root", allow_outside_root=True)["image"] == "/abs/1.jpg"
    roles = {"id": "u", "image": "i.png", "conversations": [{"from": "user", "value": "<image> q"},
                                                              {"from": "assistant", "value": "a"}]}
    assert parse_record(roles, None)["questions"] == ["q"]


@pytest.mark.parametrize("record, reason", [
    ({"id": "t", "conversations": conv(("q", "a"))}, "no_image"),
    ({"id": "t", "image": "i.png", "conversations": [{"from": "gpt", "value": "a"}]}, "no_human_turn"),
    ({"id": "t", "image": "i.png", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"},
                                                      {"from": "gpt", "value": "a"}]}, "turn_order"),
    ({"id": "t", "image": "i.png", "conversations": conv(("q", "a"), ("q2", None))}, "turn_order"),
    ({"id": "t", "image": "i.png", "conversations": conv(("q", "a"), ("q2", "   "))}, "empty_answer"),
    ({"id": "t", "image": "i.png", "conversations": "not a list"}, "bad_record"),
    ("just a string", "bad_record"),
])
def test_parse_record_skip_reasons(record, reason):
    with pytest.raises(SkipSample) as err:
        parse_record(record, None)
    assert err.value.reason == reason


def test_read_records_jsonl_bad_line_and_missing_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "1"}\n{broken\n\n{"id": "2"}\n')
    recs = read_records(p)
    assert [r["id"] if isinstance(r, dict) else r.reason for r in recs] == ["1", "bad_record", "2"]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json")


def test_subset_is_seeded_and_sized():
    a, b, c = subset_indices(1000, 0.1, 0), subset_indices(1000, 0.1, 0), subset_indices(1000, 0.1, 1)
    assert a == b and a != c and len(a) == 100 and a == sorted(a)
    assert subset_indices(5, 1.0, 0) == [0, 1, 2, 3, 4] and len(subset_indices(3, 0.01, 0)) == 1


def _write_images(tmp_path, n):
    for i in range(n):
        make_image(80 + 10 * i, 60, seed=i).save(tmp_path / f"{i}.png")


def test_load_llava_counts_and_wrong_root(tmp_path):
    _write_images(tmp_path, 3)
    records = [{"id": f"g{i}", "image": f"{i}.png", "conversations": conv(("q", "a"))} for i in range(3)]
    records += [{"id": "m", "image": "missing.png", "conversations": conv(("q", "a"))},
                {"id": "e", "image": "0.png", "conversations": conv(("q", ""))}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records))
    counter = SkipCounter(max_fraction=0.5)
    ds = load_llava([str(f)], str(tmp_path), counter)
    assert len(ds) == 3 and ds[0]["key"] == 0 and ds[2]["id"] == "g2"
    assert counter.summary() == {"records": 5, "skipped": 2, "by_reason": {"empty_answer": 1, "missing_image": 1}}
    with pytest.raises(TooManySkipped, match="image_root"):
        load_llava([str(f)], str(tmp_path / "wrong"), SkipCounter(max_fraction=0.5))


def test_skip_counter_runtime_ceiling_and_merge():
    c = SkipCounter(max_fraction=0.3, min_seen=4, log_first=0)
    c.attempt(False)
    c.skip("unreadable_image", "x", key=1)
    c.check()  # fewer than min_seen attempts: no verdict yet
    for _ in range(3):
        c.attempt(True)
    c.check()  # 1 of 4 = 25% <= 30%
    c.attempt(False)
    c.skip("unreadable_image", "x", key=1)  # the same record again: counted once
    assert c.skipped == 1
    with pytest.raises(TooManySkipped, match="2 of 5"):
        c.check()
    other = SkipCounter()
    other.skip("too_long", "y", key=2)
    c.merge(other.state())
    assert c.counts == {"unreadable_image": 1, "too_long": 1}


def test_sample_dataset_runtime_skips_and_collate(tmp_path, tiny_model):
    make_image(300, 120).save(tmp_path / "wide.png")
    make_image(60, 60).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    long_answer = "word " * 2000
    records = [{"id": "wide", "image": "wide.png", "conversations": conv(("what?", "a thing"), ("more?", "yes"))},
               {"id": "small", "image": "small.png", "conversations": conv(("q", "short"))},
               {"id": "bad", "image": "bad.png", "conversations": conv(("q", "a"))},
               {"id": "long", "image": "small.png", "conversations": conv(("q", long_answer))}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records))
    ds = SampleDataset(load_llava([str(f)], str(tmp_path), SkipCounter(max_fraction=1.0)), tiny_model.processor,
                       "contrastive")
    items = [ds[i] for i in range(len(ds))]
    assert [x.reason for x in items if isinstance(x, Skipped)] == ["unreadable_image", "too_long"]
    mb = Collator(tiny_model.tokenizer.pad_token_id)(items)
    assert isinstance(mb, MicroBatch) and mb.n_samples == 2 and len(mb.skipped) == 2
    b = mb.batch
    # paper rule: 300x120 (r = 2.5) -> 4 x ceil(4 / 2.5) = 8 local views; 60x60 upsized to 3 x 3
    assert b.views_per_sample == [1 + 8, 1 + 9]
    assert b.pixel_values.shape[0] == sum(b.views_per_sample)
    assert [len(q) for q in b.questions] == [2, 1] and b.answer_tokens.shape[0] == 3
    assert b.input_ids.shape == b.labels.shape and b.attention_mask[1].sum() < b.attention_mask[0].sum()
    assert Collator(0)([items[2]]).batch is None


def test_resumable_sampler_resumes_mid_epoch_and_shards():
    full = list(ResumableBatchSampler(10, 3, seed=5, epoch=1))
    flat = [i for b in full for i in b]
    assert len(full) == 4 and len(flat) == 12 and set(flat) == set(range(10))  # the last batch wraps round
    assert list(ResumableBatchSampler(10, 3, seed=5, epoch=1, start=2)) == full[2:]
    assert list(ResumableBatchSampler(10, 3, seed=5, epoch=2)) != full
    r0 = list(ResumableBatchSampler(10, 2, seed=0, rank=0, world=2))
    r1 = list(ResumableBatchSampler(10, 2, seed=0, rank=1, world=2))
    assert len(r0) == len(r1) == 3
    assert set(i for b in r0 + r1 for i in b) == set(range(10))
    with pytest.raises(ValueError, match="no usable"):
        ResumableBatchSampler(0, 2, seed=0)


def test_sampler_draws_one_n_per_micro_batch_reproducibly():
    choices = (1, 2, 4, 8)
    full = list(ResumableBatchSampler(40, 2, seed=3, epoch=1, n_choices=choices))
    assert len(full) == 20
    ns = [{n for _, n in b} for b in full]
    assert all(len(s) == 1 for s in ns)  # one N per micro-batch
    drawn = [s.pop() for s in ns]
    assert set(drawn) == set(choices)  # 20 draws of 4 values: all seen (P(miss one) < 0.02, fixed by the seed)
    plain = list(ResumableBatchSampler(40, 2, seed=3, epoch=1))
    assert [[i for i, _ in b] for b in full] == plain  # same record order as without choices
    assert list(ResumableBatchSampler(40, 2, seed=3, epoch=1, start=7, n_choices=choices)) == full[7:]  # resume
    r0 = list(ResumableBatchSampler(40, 2, seed=3, epoch=1, rank=0, world=2, n_choices=choices))
    r1 = list(ResumableBatchSampler(40, 2, seed=3, epoch=1, rank=1, world=2, n_choices=choices))
    assert [b[0][1] for b in r0] == [b[0][1] for b in r1] == drawn[:10]  # every rank draws the same N
    other = list(ResumableBatchSampler(40, 2, seed=3, epoch=2, n_choices=choices))
    assert [b[0][1] for b in other] != drawn


def test_sample_dataset_builds_the_drawn_n(tmp_path, tiny_model):
    make_image(120, 90).save(tmp_path / "a.png")
    records = [{"id": "a", "image": "a.png", "conversations": conv(("what?", "a thing"), ("more?", "yes"))}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records))
    ds = SampleDataset(load_llava([str(f)], str(tmp_path), SkipCounter()), tiny_model.processor, "generation")
    later = tiny_model.config.fusion.later
    base = ds[0]
    assert (base.n_queries, base.n_queries_later) == (tiny_model.config.fusion.n_queries, later)
    for n in (1, later + 1):
        s = ds[(0, n)]
        assert (s.n_queries, s.n_queries_later) == (n, min(n, later))
        assert int(s.fused_mask.sum()) == n + min(n, later)  # N slots for the first question, N' for the second
