"""A DataLoader worker (data.num_workers=1) changes nothing but where images are decoded:
the same batches, the same weights, the same skip counts as loading in the training process."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from fusion_vlm.training.config import load_train_config
from fusion_vlm.training.loop import train
from fusion_vlm.training.tiny_data import make_tiny_dataset


def test_worker_gives_the_same_weights_and_skips(tmp_path):
    path = make_tiny_dataset(tmp_path / "data", n=6, seed=4)
    root = tmp_path / "data"
    (root / "corrupt.png").write_bytes(b"not a png")
    recs = json.loads(path.read_text()) + [{"id": "corrupt", "image": "corrupt.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    runs = {}
    for workers in (0, 1):
        cfg = load_train_config("tiny_stage2", [
            f"data.files=[{f}]", f"data.image_root={root}", f"output_dir={tmp_path / f'w{workers}'}",
            "init_from=null", "logging.progress_bar=false", "micro_batch_size=2", "grad_accum=1",
            "checkpoint.every=0", "max_steps=4", "n_queries_choices=[1,2]", f"data.num_workers={workers}"])
        result = train(cfg)
        runs[workers] = (load_file(tmp_path / f"w{workers}/final/model.safetensors"), result.skips)
    (w0, skips0), (w1, skips1) = runs[0], runs[1]
    assert skips0["by_reason"] == skips1["by_reason"] == {"unreadable_image": 1}
    assert w0.keys() == w1.keys()
    assert all(w0[k].equal(w1[k]) for k in w0)
