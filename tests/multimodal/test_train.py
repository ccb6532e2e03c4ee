"""The multimodal task (``multimodal.train.MultimodalTask``) run by ``core.run.train`` on the real Hydra
config, shrunk to a few CPU steps."""

from __future__ import annotations

import json

import pytest
import torch

from core.run import summary, train, with_default_router
from multimodal.train import MultimodalTask
from multimodal.training import recall_at_k
from tests.conftest import compose

TINY = ["debug=default", "trainer.max_steps=4", "trainer.log_every_steps=1", "trainer.checkpoint=false", "data.image_size=16",
        "data.fashion_mnist_train=400", "data.limit_eval=64", "data.batch_size=16", "threads=1"]
MICRO_CLIP = ["model.model_name=mm-clip-micro-p4-16"]
MICRO_LIMOE = ["model.width=32", "model.heads=2", "model.layers=2", "model.context_length=16", "model.embed_dim=32"]


def _run(tmp_path, overrides):
    return train(compose("multimodal", *TINY, f"output_dir={tmp_path}", *overrides), MultimodalTask())


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
    assert m["router"] == "expert_choice"  # the +router choice (its module's name under compose())
    assert 0.25 <= m["val_text_top_expert_share"] <= 1.0
    assert set(m["val_expert_usage"]) == {"image", "text"}
    # routing on held-out pairs of both sources; no retrieval scored there
    assert 0.25 <= m["mix_text_top_expert_share"] <= 1.0 and "mix_i2t_r1" not in m
    # the printed summary: the task's quality lines first, the run directory last
    lines = summary({**m, "run_dir": tmp_path}, MultimodalTask()).splitlines()
    assert lines[1].startswith("  zero-shot acc") and lines[2].startswith("  retrieval")
    assert lines[3].startswith("  by modality") and lines[-1].endswith(str(tmp_path))


def test_train_limoe(tmp_path):
    m = _run(tmp_path, ["model=limoe"] + MICRO_LIMOE)
    _check(m, tmp_path)
    assert m["router"] == "topk top_k=1 batch_priority=true"  # LIMoE's own router (the model config's default)
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


@pytest.mark.parametrize("model,expected", [
    ("clip_moe", dict(top_k=2, capacity_factor=None, noise_std=0.0, renormalize=True, batch_priority=False,
                      switch_loss_weight=0.01, importance_loss_weight=0.0, load_loss_weight=0.0)),
    ("limoe", dict(top_k=1, capacity_factor=1.05, noise_std=1.0, renormalize=False, batch_priority=True,
                   switch_loss_weight=0.0, importance_loss_weight=0.005, load_loss_weight=0.005)),
])
def test_default_router_is_the_papers(model, expected):
    """Without +router, the model config's ``default_router`` becomes the run's router node (CLIP-MoE:
    Mixtral's top-2 with a 0.01 load-balance loss; LIMoE: top-1 with Batch Priority Routing)."""
    cfg = compose("multimodal", f"model={model}")
    assert with_default_router(cfg) == {"clip_moe": "mixtral switch_loss_weight=0.01",
                                        "limoe": "topk top_k=1 batch_priority=true"}[model]
    assert "default_router" not in cfg.model and cfg.model.router._target_ == "core.routers.topk.TopKRouter"
    assert {k: cfg.router[k] for k in expected} == expected


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.1]])
    # ranks of the diagonal: row 0 first, row 1 second, row 2 second
    assert recall_at_k(sim, ks=(1, 2)) == pytest.approx({"r1": 1 / 3, "r2": 1.0})
