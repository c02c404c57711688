"""The frozen LLM's gradient checkpointing really runs, and stage 1 can be built without the LLM.

transformers checkpoints a decoder layer only while the layer is in training mode; the
frozen LLM used to stay in eval mode, so ``llm.grad_checkpointing`` did nothing. With
``llm.load=false`` (stage 1) the model holds no LLM tensor and still hands over to stage 2.
"""

from __future__ import annotations

import pytest
import torch

from fusion_vlm.model import FusionVLM
from fusion_vlm.processor import collate
from conftest import make_image


def _batch(model):
    p = model.processor
    s1 = p.build(make_image(300, 200, 1), [("What colour is the square?", "red"), ("How many?", "three")],
                 with_answers_for_contrastive=True)
    s2 = p.build(make_image(120, 500, 2), [("Describe the image.", "a blue circle and a red square")],
                 with_answers_for_contrastive=True)
    return collate([s1, s2], model.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def pair():
    """The tiny model without and with LLM checkpointing, same weights, both in training mode."""
    torch.manual_seed(0)
    plain = FusionVLM.from_config("tiny")
    ckpt = FusionVLM.from_config("tiny", ["llm.grad_checkpointing=true"])
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        m.set_stage("generation")
        m.train()
    return plain, ckpt


def _count_layer_runs(model):
    """Per decoder layer: how often its MLP started (inside the checkpointed region; a pre-hook, since the
    recompute stops early once the last tensor backward needs is rebuilt, before the MLP returns)."""
    counts = [0] * len(model.llm.model.layers)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, layer in enumerate(model.llm.model.layers)]
    return counts, hooks


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    counts, hooks = _count_layer_runs(model)
    try:
        loss = model(batch, "generation")["loss"]
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, counts


def test_llm_layers_are_recomputed_only_with_checkpointing(pair):
    plain, ckpt = pair
    batch = _batch(plain)
    loss_p, grads_p, counts_p = _step(plain, batch)
    loss_c, grads_c, counts_c = _step(ckpt, batch)
    assert counts_p == [1, 1]  # forward only
    assert counts_c == [2, 2]  # forward + recompute in backward
    torch.testing.assert_close(loss_c, loss_p, rtol=0, atol=0)
    assert grads_p.keys() == grads_c.keys() and any(k.startswith("projector.") for k in grads_p)
    assert not any(k.startswith("llm.") for k in grads_p)  # the LLM stays frozen
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(g.abs().sum() > 0 for k, g in grads_p.items() if k.startswith(("projector.", "fusion.")))


def test_checkpointing_keeps_the_llm_modules_in_eval_mode(pair):
    _, ckpt = pair
    layers = ckpt.llm.model.layers
    assert all(layer.training and layer.gradient_checkpointing for layer in layers)
    below = [m for layer in layers for m in layer.modules() if m is not layer]
    assert below and not any(m.training for m in below)  # attention, MLP, norms: eval (no dropout)
    assert not ckpt.llm.training and not ckpt.llm.model.training
    ckpt.eval()
    assert not any(layer.training for layer in layers)  # eval(): no checkpointing at all
    ckpt.train()
    assert all(layer.training for layer in layers)


def test_generate_is_unaffected_by_checkpointing(pair):
    plain, ckpt = pair
    images, questions = [make_image(200, 160, 3)], [["What is shown?", "Which colour?"]]
    ref = plain.eval().generate(images, questions, max_new_tokens=6)
    try:
        assert ckpt.train().generate(images, questions, max_new_tokens=6) == ref  # train mode: flag on, no_grad
        assert ckpt.eval().generate(images, questions, max_new_tokens=6) == ref
    finally:
        plain.train(), ckpt.train()


def test_llm_with_dropout_refuses_checkpointing():
    with pytest.raises(ValueError, match=r"llm.grad_checkpointing: .*attention_dropout"):
        FusionVLM.from_config("tiny", ["llm.grad_checkpointing=true",
                                       "llm.tiny={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, "
                                       "num_attention_heads: 4, attention_dropout: 0.1}"])


# ------------------------------------------------------------------ stage 1 without the LLM
def test_model_without_llm_holds_no_llm_tensor():
    torch.manual_seed(0)
    full = FusionVLM.from_config("tiny")
    bare = FusionVLM.from_config("tiny", ["llm.load=false"])
    assert bare.llm is None and not any(k.startswith("llm.") for k in bare.state_dict())
    n_llm = sum(p.numel() for p in full.llm.parameters())
    assert sum(p.numel() for p in bare.parameters()) == sum(p.numel() for p in full.parameters()) - n_llm
    assert bare.projector.proj.weight.shape == full.projector.proj.weight.shape  # width from the LLM config
    assert set(bare.trained_state_dict()) == set(full.trained_state_dict())
    batch = _batch(bare)
    out = bare(batch, "contrastive")  # stage 1 runs
    assert torch.isfinite(out["loss"])
    with pytest.raises(RuntimeError, match=r"^the generation stage needs the LLM.*llm.load=false"):
        bare(batch, "generation")
    with pytest.raises(RuntimeError, match=r"^generate\(\) needs the LLM.*llm.load=true"):
        bare.generate([make_image(100, 100)], [["What?"]])


def test_paper_stage1_memory_plan_has_no_llm():
    from fusion_vlm.config import load_model_config
    from fusion_vlm.training.config import load_train_config
    from fusion_vlm.training.memory import estimate_memory

    tcfg = load_train_config("stage1_contrastive")
    assert "llm.load=false" in tcfg.model_overrides
    cfg = load_model_config("paper", tcfg.model_overrides_all())
    est = estimate_memory(cfg, tcfg, zero_stage=2, n_gpus=8)
    assert est.params_total < 1.5e9  # ViT-H + CLIP text + fusion; Llama-2-7B's 6.7 B are not held
    assert est.micro_batch == 32 and est.fits(40.0), est.total


def test_stage1_without_llm_hands_over_to_stage2(tmp_path):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from fusion_vlm.training.config import load_train_config
    from fusion_vlm.training.loop import train
    from fusion_vlm.training.tiny_data import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=6, seed=0)
    common = [f"data.files=[{data}]", f"data.image_root={tmp_path / 'data'}", "logging.progress_bar=false",
              "logging.wandb_mode=disabled", "checkpoint.every=0", "max_steps=1"]
    s1 = train(load_train_config("tiny_stage1", [*common, f"output_dir={tmp_path / 's1'}",
                                                 "model_overrides=[llm.load=false]", "micro_batch_size=3"]))
    assert s1.steps == 1 and not any(n.startswith("llm.") for n in s1.optimizer_params)
    export = s1.final_dir
    assert not (export / "llm.safetensors").exists()
    assert not any(k.startswith("llm.") for k in load_file(str(export / "model.safetensors")))
    s2 = train(load_train_config("tiny_stage2", [*common, f"output_dir={tmp_path / 's2'}", f"init_from={export}"]))
    assert s2.steps == 1 and any(n.startswith("projector.") for n in s2.optimizer_params)
    model = FusionVLM.from_pretrained(s2.final_dir)
    assert model.config.llm.load and model.llm is not None and (s2.final_dir / "llm.safetensors").is_file()
    stage1 = load_file(str(export / "model.safetensors"))  # stage 2 started from the stage-1 weights
    stage2 = load_file(str(s2.final_dir / "model.safetensors"))
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith("text_encoder."))
