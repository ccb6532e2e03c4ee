"""The multimodal training entry point on the real Hydra config, shrunk to a few CPU steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from multimodal.train import recall_at_k, train

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
TINY = ["debug=default", "trainer.max_steps=4", "trainer.log_every_steps=1", "trainer.checkpoint=false", "data.image_size=16",
        "data.fashion_mnist_train=400", "data.limit_eval=64", "data.batch_size=16", "threads=1"]
MICRO_CLIP = ["model.model_name=mm-clip-micro-p4-16"]
MICRO_LIMOE = ["model.width=32", "model.heads=2", "model.layers=2", "model.context_length=16", "model.embed_dim=32"]


def _run(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("multimodal", overrides=TINY + [f"out_dir={tmp_path}"] + overrides)
    return train(cfg)


def _check(metrics, tmp_path):
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["domain"] == "multimodal" and on_disk["steps"] == 4
    for key in ("val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5", "zeroshot_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["val_i2t_r1"] <= metrics["val_i2t_r5"]
    assert metrics["val_loss"] > 0 and (tmp_path / "history.jsonl").is_file()


def test_train_clip_moe_with_a_router(tmp_path):
    m = _run(tmp_path, ["model=clip_moe", "+router=expert_choice"] + MICRO_CLIP)
    _check(m, tmp_path)
    assert m["router"] in ("expert_choice", "ExpertChoiceRouter")  # Hydra choice, or the class under compose()
    assert 0.25 <= m["val_text_top_expert_share"] <= 1.0
    assert set(m["val_expert_usage"]) == {"image", "text"}
    # routing on held-out pairs of both sources; no retrieval scored there
    assert 0.25 <= m["mix_text_top_expert_share"] <= 1.0 and "mix_i2t_r1" not in m


def test_train_limoe(tmp_path):
    m = _run(tmp_path, ["model=limoe"] + MICRO_LIMOE)
    _check(m, tmp_path)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert any("aux_local_entropy_text" in h for h in history)
    assert all(0.25 <= h["text_top_expert_share"] <= 1.0 for h in history if "loss" in h)
    assert 0.25 <= m["mix_text_top_expert_share"] <= 1.0
    # LIMoE's collapse measure: first choices of the text tokens, on both held-out sets
    assert 0.25 <= m["val_text_top_choice_share"] <= 1.0 and 0.25 <= m["mix_text_top_choice_share"] <= 1.0
    assert all(0.25 <= h["text_top_choice_share"] <= 1.0 for h in history if "loss" in h)


def test_train_dense_clip(tmp_path):
    m = _run(tmp_path, ["model=clip"] + MICRO_CLIP)
    _check(m, tmp_path)
    assert m["router"] == "none" and "val_text_top_expert_share" not in m
    assert not any(k.startswith("mix_") for k in m)


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.1]])
    # ranks of the diagonal: row 0 first, row 1 second, row 2 second
    assert recall_at_k(sim, ks=(1, 2)) == pytest.approx({"r1": 1 / 3, "r2": 1.0})
