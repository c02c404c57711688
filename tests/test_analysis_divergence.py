"""Branch-divergence estimate: the formulas on hand-made vectors, and the pipeline on a tiny random Llama."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fusion_vlm.analysis import divergence as dv

WORDS = [f"w{i}" for i in range(120)]


# ------------------------------------------------------------------ formulas


def test_distance_and_phi_match_hand_computation_on_three_vectors():
    d = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, -2.0, 1.0, 0.0]], dtype=torch.float64)
    # D(n) = |sum of all entries of the first n rows| / sqrt(4)
    assert torch.allclose(dv.distance_curve(d), torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64))
    c01 = 1 / math.sqrt(2)
    c02 = 0.0
    c12 = -2 / (math.sqrt(2) * math.sqrt(5))
    phi = dv.phi_curve(d, phi_one=0.7)
    assert phi[0].item() == pytest.approx(0.7)  # phi(1) is the convention passed in
    assert phi[1].item() == pytest.approx(c01)
    assert phi[2].item() == pytest.approx((c01 + c02 + c12) / 3)  # mean over the 3 unordered pairs


def test_phi_matches_brute_force_and_zero_vector_counts_as_cosine_zero():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    d[4] = 0.0
    u = torch.nn.functional.normalize(d, dim=1)
    for n in range(2, 10):
        cos = u[:n] @ u[:n].T
        expect = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
        assert dv.phi_curve(d)[n - 1].item() == pytest.approx(expect.item(), abs=1e-12)


def test_bound_envelope_and_lsq_delta():
    phi = torch.tensor([1.0, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    ups = dv.upsilon(phi)
    assert torch.allclose(ups, torch.tensor([1.0, 3.0, 4.8, 6.4, 7.0], dtype=torch.float64))
    mean_d = torch.tensor([1.0, 2.5, 2.0, 3.5, 1.0], dtype=torch.float64)
    delta = dv.fit_delta(mean_d, phi, "envelope")
    assert delta == pytest.approx(2.5 / math.sqrt(3.0))
    assert bool(torch.all(delta * ups.sqrt() >= mean_d - 1e-12))
    lsq = dv.fit_delta(mean_d, phi, "lsq")
    assert lsq == pytest.approx(float((mean_d * ups.sqrt()).sum() / ups.sum()))
    assert lsq < delta
    with pytest.raises(ValueError):
        dv.fit_delta(mean_d, phi, "max")


def test_thresholds_on_synthetic_phi():
    phi = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.25, 0.2495, 0.249, 0.2], dtype=torch.float64)
    ratio = dv.term_ratio(phi)
    assert math.isinf(ratio[0].item())  # no second term at n = 1
    assert ratio[1].item() == pytest.approx(1 / 0.9)
    assert ratio[2].item() == pytest.approx(1 / (2 * 0.5))
    # r(n) = 1/((n-1) phi(n)): 1.11, 1.0, 1.11, 1.33... -> first below 1.05 is n = 3
    assert dv.ratio_threshold(ratio, 1.05) == 3
    assert dv.ratio_threshold(ratio, 0.1) is None
    # |phi(n+1) - phi(n)| for n = 2..: 0.4, 0.2, 0.05, 0.0005 -> first below 1e-3 at n = 5
    assert dv.phi_threshold(phi, 1e-3) == 5
    assert dv.phi_threshold(phi, 1e-9) is None
    # a negative phi makes the second term vanish: ratio inf, never below the threshold
    assert math.isinf(dv.term_ratio(torch.tensor([1.0, -0.5]))[1].item())


def test_average_curves_uses_only_pairs_that_reach_n():
    a = (torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.5, 0.4], dtype=torch.float64))
    b = (torch.tensor([3.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    cur = dv.average_curves([a, b])
    assert cur.mean_distance.tolist() == [2.0, 2.0, 3.0]
    assert cur.counts.tolist() == [2, 1, 1]
    assert cur.phi.tolist() == pytest.approx([1.0, 0.5, 0.4])


# ------------------------------------------------------------------ pipeline on a tiny Llama


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_llm")
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(root)

    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(WORDS, size=n))  # noqa: E731
    pairs = [{"system": text(3) if k % 2 else "", "question": text(int(rng.integers(3, 8))),
              "chosen": text(int(rng.integers(4, 20))), "rejected": text(int(rng.integers(4, 20)))}
             for k in range(7)]
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root, pairs_file, pairs


def test_pipeline_shapes_ranges_and_bound(tiny_llm):
    root, pairs_file, pairs = tiny_llm
    model, tok = dv.load_model(root)
    loaded = dv.load_pairs(pairs_file)
    assert loaded == pairs
    curves = dv.estimate_divergence(model, tok, loaded, batch_size=3, progress=False)
    lengths = [min(len(p["chosen"].split()), len(p["rejected"].split())) for p in pairs]
    assert curves.mean_distance.shape == curves.phi.shape == (max(lengths),)
    assert curves.counts.tolist() == [sum(n >= k for n in lengths) for k in range(1, max(lengths) + 1)]
    assert np.all(np.abs(curves.phi) <= 1 + 1e-9)
    assert np.all(curves.mean_distance >= 0) and curves.mean_distance[-1] > 0
    res = dv.analyse(curves, ratio_value=1.0, phi_epsilon=1e-2)
    assert np.all(np.asarray(res["bound"]) >= np.asarray(res["mean_distance"]) - 1e-9)
    assert res["phi_threshold"] is None or 2 <= res["phi_threshold"] < len(res["n"])
    assert res["ratio_threshold"] is None or 2 <= res["ratio_threshold"] <= len(res["n"])
    json.dumps(res)  # JSON-ready


def test_batching_and_padding_do_not_change_the_result(tiny_llm):
    root, _, pairs = tiny_llm
    model, tok = dv.load_model(root)
    one = dv.estimate_divergence(model, tok, pairs, batch_size=1, progress=False)
    many = dv.estimate_divergence(model, tok, pairs, batch_size=7, progress=False)
    assert np.allclose(one.mean_distance, many.mean_distance, atol=1e-5)
    assert np.allclose(one.phi, many.phi, atol=1e-5)


def test_shared_leading_answer_tokens_give_exact_zero_differences(tiny_llm):
    root, _, _ = tiny_llm
    model, tok = dv.load_model(root)
    pair = {"system": "", "question": "w1 w2", "chosen": "w5 w6 w7 w8", "rejected": "w5 w6 w9 w10 w11"}
    (d,) = dv.answer_differences(model, tok, [pair])
    assert d.shape == (4, 32)
    assert torch.all(d[:2] == 0) and torch.all(d[2:].norm(dim=1) > 0.1)
    h = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    kept = dv.branch_differences(h, h + torch.tensor([[1e-9, 0.0], [0.5, 0.0]]), rel_tol=1e-6)
    assert kept[0].tolist() == [0.0, 0.0] and kept[1].tolist() == pytest.approx([-0.5, 0.0])


def test_prefix_uses_chat_template_when_present(tiny_llm):
    root, _, _ = tiny_llm
    _, tok = dv.load_model(root)
    plain = dv.prefix_ids(tok, "w1", "w2 w3")
    assert tok.convert_ids_to_tokens(plain)[-3:] == ["w1", "w2", "w3"]
    tok.chat_template = "{% for m in messages %}w9 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w8{% endif %}"
    templ = dv.prefix_ids(tok, "w1", "w2 w3")
    assert tok.convert_ids_to_tokens(templ) == ["w9", "w1", "w9", "w2", "w3", "w8"]


def test_user_errors_name_the_input(tmp_path, tiny_llm):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        dv.load_pairs(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="rejected"):
        dv.load_pairs(bad)
    with pytest.raises(FileNotFoundError, match="no_model"):
        dv.load_model(tmp_path / "no_model")


def test_cli_divergence_end_to_end(tiny_llm, tmp_path, capsys):
    from fusion_vlm.cli import main

    root, pairs_file, _ = tiny_llm
    out = tmp_path / "div"
    rc = main(["divergence", "--model", str(root), "--pairs", str(pairs_file), "--out", str(out),
               "--max-pairs", "5", "--batch-size", "2", "--ratio-threshold", "0.5", "--phi-epsilon", "0.05",
               "--no-progress"])
    assert rc == 0
    res = json.loads((out / "divergence.json").read_text())
    assert res["n_pairs"] == 5 and res["ratio_value"] == 0.5 and res["phi_epsilon"] == 0.05
    assert (out / "divergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "divergence.csv").read_text().splitlines()) == len(res["n"]) + 1
    assert "threshold 1" in capsys.readouterr().out
    assert main(["divergence", "--model", str(root), "--pairs", str(tmp_path / "x.jsonl"), "--out", str(out)]) == 2
