"""Cost model: hand-computed FLOPs/KV bytes, a measured FLOP count of a real tiny Llama, configs, CLI --llm."""

from __future__ import annotations

import json

import pytest

from fusion_vlm.cli import main
from fusion_vlm.tokens import cost
from fusion_vlm.tokens.cost import (FUSION_MODULE, LLAMA2_7B, TransformerConfig, decode_flops, fusion_flops,
                                    kv_cache_bytes, load_llm_config, prefill_flops, prefill_speedup)

TOY = TransformerConfig("toy", hidden=8, layers=1, heads=2, kv_heads=1, intermediate=16, vocab=10)


def test_toy_prefill_by_hand():
    # weights: q 8x8=64, k 8x4=32, v 32, o 64, gated MLP 3*8*16=384 -> 576 per layer
    assert TOY.d_head == 4 and TOY.weights_per_layer == 576
    linear = 2 * 5 * 576  # 5 tokens
    attn = 4 * 1 * 2 * 4 * (1 + 2 + 3 + 4 + 5)  # QK^T + AV, token i sees i keys
    head = 2 * 8 * 10  # logits of the last token only
    assert prefill_flops(TOY, 5) == linear + attn + head == 6400
    assert prefill_flops(TOY, 5, causal=False, lm_head_tokens=5) == linear + 4 * 2 * 4 * 25 + 5 * head
    # 3 new tokens after 4 cached: keys seen 5, 6, 7
    assert prefill_flops(TOY, 3, prefix=4) == 2 * 3 * 576 + 4 * 2 * 4 * (5 + 6 + 7) + head
    assert decode_flops(TOY, 9) == 2 * 576 + 4 * 2 * 4 * 10 + head


def test_kv_bytes():
    assert kv_cache_bytes(TOY, 7, "float32") == 2 * 1 * 1 * 4 * 7 * 4
    assert kv_cache_bytes(LLAMA2_7B, 1, "bf16") == 2 * 32 * 32 * 128 * 2 == 524288  # 0.5 MiB per token
    assert kv_cache_bytes(LLAMA2_7B, 1450, "fp16") == 1450 * 524288
    with pytest.raises(ValueError):
        kv_cache_bytes(TOY, 1, "float12")


def test_llama2_7b_preset():
    # known parameter count of Llama-2-7b-hf (6,738,415,616) = ours + RMSNorm weights (2 per layer + final)
    assert LLAMA2_7B.params + (2 * 32 + 1) * 4096 == 6_738_415_616


def test_matches_measured_flops_of_a_tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="eager").eval()
    cfg = TransformerConfig.from_hf(hf)
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.intermediate, cfg.vocab) == (64, 2, 4, 2, 96, 100)
    with torch.no_grad():
        with FlopCounterMode(display=False) as first:
            out = model(torch.randint(0, 100, (1, 7)), use_cache=True)
        with FlopCounterMode(display=False) as second:
            model(torch.randint(0, 100, (1, 3)), past_key_values=out.past_key_values, use_cache=True)
    # eager attention multiplies the full (masked) score matrix and HF computes logits for every position
    assert first.get_total_flops() == prefill_flops(cfg, 7, causal=False, lm_head_tokens=7)
    assert second.get_total_flops() == prefill_flops(cfg, 3, prefix=7, causal=False, lm_head_tokens=3)


def test_from_hf_and_loading(tmp_path):
    data = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
            "vocab_size": 32000, "model_type": "llama"}
    cfg = TransformerConfig.from_hf(data)
    assert (cfg.kv_heads, cfg.d_head, cfg.weights_per_layer) == (32, 128, LLAMA2_7B.weights_per_layer)
    assert TransformerConfig.from_hf({"text_config": data}).hidden == 4096
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**data, "num_key_value_heads": 8, "head_dim": 64}))
    loaded = load_llm_config(tmp_path / "m")
    assert (loaded.name, loaded.kv_heads, loaded.d_head) == ("m", 8, 64)
    assert load_llm_config("Llama-2-7B") is LLAMA2_7B
    with pytest.raises(ValueError, match="intermediate_size"):
        TransformerConfig.from_hf({k: v for k, v in data.items() if k != "intermediate_size"})
    with pytest.raises(FileNotFoundError):
        load_llm_config(tmp_path / "nothing.json")


def test_fusion_module_costs():
    first = fusion_flops(1450, 32, 256)
    adapter = 2 * 1450 * 1280 * 1024
    projector = 2 * 256 * 1024 * 4096
    assert first == adapter + prefill_flops(FUSION_MODULE, 1450 + 32 + 256, lm_head_tokens=0) + projector
    # a later question reuses the cached prefix: only its 32 + 8 tokens are computed
    later = fusion_flops(0, 32, 8, prefix=1450 + 32 + 256)
    assert later == prefill_flops(FUSION_MODULE, 40, prefix=1738, lm_head_tokens=0) + 2 * 8 * 1024 * 4096
    assert later < first / 20


def test_prefill_speedup():
    rep = prefill_speedup(n_queries=256, question_tokens=32, prompt_tokens=32)
    assert rep.baseline_flops == prefill_flops(LLAMA2_7B, 32 + 1450 + 32)
    assert rep.fusion_llm_flops == prefill_flops(LLAMA2_7B, 32 + 256 + 32)
    assert rep.fusion_module_flops == fusion_flops(1450, 32, 256)
    assert rep.speedup == pytest.approx(rep.baseline_flops / (rep.fusion_module_flops + rep.fusion_llm_flops))
    assert 3 < rep.speedup < 4.5
    speeds = [prefill_speedup(n_queries=n).speedup for n in (768, 256, 64, 8, 1)]
    assert speeds == sorted(speeds)  # fewer fused tokens, faster
    assert prefill_speedup(n_queries=256, shared_flops=1e13).speedup < rep.speedup
    multi = prefill_speedup(n_queries=256, n_questions=3, answer_tokens=20)
    assert (multi.baseline_context, multi.fusion_context) == (1514 + 2 * 52, 320 + 2 * 60)
    with pytest.raises(ValueError):
        prefill_speedup(n_questions=0)


def test_cli_llm_json(capsys, tmp_path):
    assert main(["tokens", "--size", "1008x1008", "--json", "--llm", "llama-2-7b", "--kv-dtype", "fp16"]) == 0
    out = json.loads(capsys.readouterr().out)
    for row in out["models"]:
        assert row["llm"]["kv_cache_bytes"] == kv_cache_bytes(LLAMA2_7B, row["total"], "fp16")
        assert row["llm"]["prefill_flops"] == prefill_flops(LLAMA2_7B, row["total"], lm_head_tokens=0)
    assert out["fusion_speedup"]["speedup"] == pytest.approx(prefill_speedup(n_queries=256).speedup)
    assert main(["tokens", "--size", "8x8", "--llm", str(tmp_path / "missing.json")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert cost.PRESETS["fusion-module"] is FUSION_MODULE
