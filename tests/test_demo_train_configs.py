"""The demo's stage configs: every stage asks each question on its own; stages 1-2 draw N, stage 3 fixes it."""

from __future__ import annotations

from pathlib import Path

from fusion_vlm.demo.pipeline import SIZES
from fusion_vlm.demo.stages import stage_train_config


def test_stages_ask_questions_independently_draw_n_and_stage3_keeps_the_files(tmp_path):
    size, data = SIZES["quick"], Path(tmp_path)
    s1 = stage_train_config("contrastive", tmp_path / "s1", data, size, 3, 0)
    s2 = stage_train_config("generation", tmp_path / "s2", data, size, 3, 0)
    s3 = stage_train_config("generation", tmp_path / "s3", data, size, 3, 0, n_queries=4,
                       data={"fraction": 0.5, "fraction_seed": 7})
    assert s1.data.independent_questions and s2.data.independent_questions and s3.data.independent_questions
    assert s1.n_queries_choices == s2.n_queries_choices == list(size.n_values) and s3.n_queries_choices == []
    assert s3.data.files == s2.data.files == [str(data / "train.jsonl")] and s3.data.image_root == str(data)
    assert (s3.data.fraction, s3.data.fraction_seed, s2.data.fraction) == (0.5, 7, 1.0)
    assert s3.n_queries == 4 and s2.n_queries is None
    assert s1.engine.deterministic and s2.engine.deterministic and s3.engine.deterministic  # same bits under load
