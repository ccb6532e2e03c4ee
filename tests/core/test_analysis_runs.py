"""The routing analyses written by a vision and a multimodal run (``analysis.enabled=true``): the labels
each domain offers (patch position and class; position and modality), early routing learning from the
snapshots, X-MoE's collapse measure, and what is n/a with its reason."""

from __future__ import annotations

import json

from core.run import train
from multimodal.train import MultimodalTask
from tests.conftest import compose

MM_TINY = ["debug=default", "trainer.max_steps=4", "trainer.checkpoint=false", "data.image_size=16",
           "data.fashion_mnist_train=400", "data.limit_eval=64", "data.batch_size=16", "threads=1",
           "analysis.enabled=true", "analysis.max_batches=1"]


def test_vision_run_writes_the_analyses_by_patch_position_and_class(tmp_path):
    metrics = train(compose("vision", "debug=default", "trainer.max_steps=8", "analysis.enabled=true",
                            "analysis.max_batches=1", f"output_dir={tmp_path}"))
    a = json.loads((tmp_path / "analysis.json").read_text())
    assert 0.0 <= a["explained_by_position"] <= 1.0 and 0.0 <= a["explained_by_class"] <= 1.0
    assert a["uniform_purity"] <= a["position_purity"] <= 1.0
    assert set(a["stability"]) == {"0", "4"} and a["stability_label"] == "position"  # 10% and 50% of 8 steps
    assert (tmp_path / "routing_snapshots.pt").is_file()
    assert len(a["drop_rate_by_position"]["no_bpr"]["per_position"]) > 1
    col = a["representation_collapse"]
    assert 0.0 <= col["gate_span_share"] <= 1.0 and 0.0 < col["effective_rank_ratio"] <= 1.0
    assert metrics["analysis"]["explained_by_position"] == a["explained_by_position"]


def test_vision_analyses_are_off_by_default(tmp_path):
    metrics = train(compose("vision", "debug=default", "trainer.max_steps=2", f"output_dir={tmp_path}"))
    assert "analysis" not in metrics and not (tmp_path / "analysis.json").exists()


def test_multimodal_runs_write_position_and_modality_where_it_applies(tmp_path):
    clip = tmp_path / "clip"
    train(compose("multimodal", *MM_TINY, f"output_dir={clip}", "model.model_name=mm-clip-micro-p4-16"),
          MultimodalTask())
    a = json.loads((clip / "analysis.json").read_text())
    assert 0.0 <= a["explained_by_position"] <= 1.0 and "explained_by_modality" not in a
    assert "one modality" in a["not_applicable"]["modality"]  # CLIP-MoE: every layer is in one tower
    limoe = tmp_path / "limoe"
    train(compose("multimodal", *MM_TINY, f"output_dir={limoe}", "model=limoe", "model.width=32", "model.heads=2",
                  "model.layers=2", "model.context_length=16", "model.embed_dim=32"), MultimodalTask())
    b = json.loads((limoe / "analysis.json").read_text())
    assert 0.0 <= b["explained_by_modality"] <= 1.0 and b["modality_layers"] >= 1  # LIMoE's shared layers
    assert "not_applicable" not in b
