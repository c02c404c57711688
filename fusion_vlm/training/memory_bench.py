"""Check the memory model (:mod:`fusion_vlm.training.memory`) against a measured training step on the CPU.

The model has the paper's widths at reduced depth (:func:`bench_model_config`:
ViT-H/14 blocks of width 1280, fusion 1024 wide, Llama-2-7B layers 4096 wide with
its 32000-token vocabulary), everything in bf16 as DeepSpeed runs it. One stage-2
sample: an HD-9 image (10 views of 336 px), 4 questions, N=256 / N'=8.

Measurement (:func:`measure_step`, run in a fresh process per setting): with
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB every tensor buffer of 64 KiB or more
is its own ``mmap`` and goes back to the OS when freed, so the resident set
follows the live tensor bytes. After the model and the batch exist, the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` <- 5), one
forward + backward runs, and ``VmHWM - VmRSS(before)`` is the step's peak: the
activations kept for backward, the gradients of the trained parameters and the
temporaries of the worst moment -- what ``torch.cuda.max_memory_allocated``
minus the weights would show on a GPU. The prediction for the same shape is the
memory model's gradients + activations (ZeRO-0, one GPU; weights, optimizer
states and the flat overhead are not part of a forward/backward).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

GIB = 1024 ** 3
MMAP_THRESHOLD = 65536


def bench_model_config(vision_layers: int = 4, fusion_layers: int = 2, llm_layers: int = 2,
                       checkpointing: bool = True):
    """The paper model (``configs/model/paper.yaml``) at reduced depth, random init, no download."""
    from fusion_vlm.config import load_model_config

    flag = str(checkpointing).lower()
    vision = {"embed_dim": 1024,  # ViT-H-14 widths (open_clip's ViT-H-14.json), fewer blocks
              "vision_cfg": {"layers": vision_layers, "width": 1280, "head_width": 80, "patch_size": 14},
              "text_cfg": {"vocab_size": 49408, "width": 1024, "heads": 16, "layers": 2}}
    llama = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": llm_layers,  # Llama-2-7B
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096}
    return load_model_config("paper", [
        f"vision.custom={json.dumps(vision)}", "vision.pretrained=null", f"fusion.num_layers={fusion_layers}",
        "llm.path=null", f"llm.tiny={json.dumps(llama)}", "llm.dtype=bfloat16",
        f"vision.grad_checkpointing={flag}", f"fusion.grad_checkpointing={flag}", f"llm.grad_checkpointing={flag}"])


def bench_batch(model, llm_tokens: int = 1024, n_questions: int = 4, views: int = 10, seed: int = 0):
    """One stage-2 sample: random views float [V, 3, S, S], ``n_questions`` turns, about ``llm_tokens`` LLM tokens."""
    import torch

    from fusion_vlm.processor import collate

    g = torch.Generator().manual_seed(seed)
    size = model.config.views.view_size
    pixels = torch.randn(views, 3, size, size, generator=g)
    question = "What is written on the sign next to the red door in the left half of the picture?"
    fused = model.config.fusion.n_queries + (n_questions - 1) * model.config.fusion.later
    text = max(0, llm_tokens - fused - n_questions * (len(question) + 20))  # byte tokenizer: 1 token per byte
    answer = ("the sign says " + "open every day " * 999)[: text // n_questions]
    sample = model.processor.build(pixels, [(question, answer)] * n_questions)
    return collate([sample], model.tokenizer.pad_token_id)


def batch_shape(batch) -> dict:
    """Token counts of a one-sample batch, in the terms of :func:`~fusion_vlm.training.memory.estimate_memory`."""
    labelled = int((batch.labels[:, 1:] != -100).sum())
    tokens = int(batch.attention_mask.sum())
    q = [len(ids) for ids in batch.questions[0]]
    return {"views": batch.pixel_values.shape[0], "n_questions": len(q), "question_tokens": sum(q) / len(q),
            "llm_tokens": tokens, "answer_fraction": labelled / tokens}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_step(checkpointing: bool, **shape) -> dict:
    """Peak bytes of one stage-2 forward + backward over the weights and batch (in this process; see module doc)."""
    import torch

    from fusion_vlm.model import FusionVLM

    torch.manual_seed(0)
    model = FusionVLM(bench_model_config(checkpointing=checkpointing), device="cpu").to(torch.bfloat16)
    model.set_stage("generation")
    model.train()
    batch = bench_batch(model, **shape)
    batch.pixel_values = batch.pixel_values.to(torch.bfloat16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss("VmRSS")
    loss = model(batch, "generation")["loss"]
    loss.backward()
    peak = _rss("VmHWM")
    return {"measured_bytes": peak - before, "loss": float(loss), **batch_shape(batch)}


def predict_step(checkpointing: bool, shape: dict) -> dict:
    """The memory model's gradients + activations (GiB) for the bench model and ``shape``."""
    from fusion_vlm.model import FusionVLM
    from fusion_vlm.training.config import TrainConfig
    from fusion_vlm.training.memory import estimate_memory

    cfg = bench_model_config(checkpointing=checkpointing)
    meta = FusionVLM(cfg, device="meta")
    est = estimate_memory(cfg, TrainConfig(stage="generation", micro_batch_size=1), zero_stage=0, n_gpus=1,
                          grad_checkpointing=checkpointing, n_questions=shape["n_questions"],
                          question_tokens=round(shape["question_tokens"]), llm_tokens=shape["llm_tokens"],
                          answer_fraction=shape["answer_fraction"], views=shape["views"], model=meta)
    return {"predicted_gib": est.gradients + est.activations, "gradients_gib": est.gradients,
            "activation_parts": est.activation_parts}


def run_bench(llm_tokens: int = 1024, threads: int = 2) -> list[dict]:
    """Measure (each setting in a fresh process) and predict with and without checkpointing."""
    rows = []
    for ckpt in (True, False):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": str(threads)}
        code = ("import json, sys; from fusion_vlm.training.memory_bench import measure_step; "
                f"print(json.dumps(measure_step({ckpt}, llm_tokens={llm_tokens})))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"measurement (checkpointing={ckpt}) failed:\n{out.stderr[-2000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        predicted = predict_step(ckpt, measured)
        gib = measured["measured_bytes"] / GIB
        rows.append({"checkpointing": ckpt, "measured_gib": gib, **predicted,
                     "ratio": gib / predicted["predicted_gib"], "shape": {k: v for k, v in measured.items()
                                                                         if k not in ("measured_bytes",)}})
    return rows
