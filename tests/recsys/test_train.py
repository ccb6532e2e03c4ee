"""recsys.train end to end on the real configs (debug budget, ``core.run.train`` with ``RecsysTask``):
metrics.json names the router and holds per-task metrics and the headline metric; the synthetic
experiment's sweep; the summary table."""

from __future__ import annotations

import json

import pytest
from core.checks import ConfigError
from core.run import train
from recsys.summarize import collect, table
from recsys.train import RecsysTask
from recsys.training import build_dataset
from tests.conftest import CONF_DIR, compose


def _compose(*overrides: str, hydra_config: bool = False):
    return compose("recsys", *overrides, return_hydra_config=hydra_config)


def test_mmoe_on_adult_with_topk_gates_writes_metrics(tmp_path):
    """The command of the issue, ``model=mmoe data=adult +router=topk``, at the debug budget."""
    cfg = _compose("model=mmoe", "data=adult", "+router=topk", "debug=default", f"output_dir={tmp_path}",
                   "router_name=topk", "model_name=mmoe", "trainer.lr=1e-2", "data.limit_train=2048",
                   "trainer.max_steps=60")
    assert cfg.model.gate._target_ == "core.routers.topk.TopKRouter"
    metrics = train(cfg, RecsysTask())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["router"] == "topk" and saved["model"] == "mmoe" and saved["data"] == "adult"
    assert saved["metric"] == "test_auc_mean" and saved["higher_is_better"] is True    # binary tasks
    for split in ("val", "test"):
        for task in ("income", "never_married"):
            assert 0.7 < saved[f"{split}_{task}_auc"] <= 1.0      # well above chance after 60 steps
            assert saved[f"{split}_{task}_logloss"] > 0
    assert metrics["steps"] == 60                                # 2 epochs of 2048 / 64 = 32, capped
    gate = saved["test_gates"]["body.mixture.gate0"]
    assert sum(gate["tokens_per_expert"]) > 0 and 0 < gate["experts_per_example"] <= 2   # top-2 with capacity
    assert saved["experts_per_token"] == saved["val_gate_experts_per_example"]
    assert 0 <= saved["dropped_fraction"] < 1
    assert (tmp_path / "history.jsonl").exists()


def test_default_gate_is_dense_and_synthetic_reports_mse(tmp_path):
    cfg = _compose("model=omoe", "data=synthetic", "debug=default", f"output_dir={tmp_path}")
    assert cfg.model.gate is None and cfg.model.default_router == "dense"   # no +router: the model's default
    metrics = train(cfg, RecsysTask())
    assert cfg.model.gate._target_ == "core.routers.dense.DenseRouter"   # conf/router/dense.yaml, put in by core.run
    assert metrics["router"] == "dense"
    assert metrics["metric"] == "test_mse_mean" and metrics["higher_is_better"] is False   # regression tasks
    assert metrics["test_task1_mse"] > 0 and metrics["test_mse_mean"] > 0
    assert metrics["data_info"]["correlation"] == 1.0


@pytest.mark.parametrize("model", ["ple", "esmm"])
def test_movielens_trains(tmp_path, model):
    cfg = _compose(f"model={model}", "data=movielens", "debug=default", f"output_dir={tmp_path}")
    metrics = train(cfg, RecsysTask())
    assert 0.0 <= metrics["test_like_auc"] <= 1.0 and 0.0 <= metrics["test_love_auc"] <= 1.0


def test_census_kdd_without_path_fails_clearly(tmp_path):
    cfg = _compose("data=census_kdd", "debug=default", f"output_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="data.path"):   # the loader's own check
        build_dataset(cfg)
    with pytest.raises(ConfigError, match="data.path"):         # a run stops at validation, before the data
        train(cfg, RecsysTask())


def test_mmoe_synthetic_experiment_is_the_papers_sweep():
    cfg = _compose("experiment=mmoe_synthetic", hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sorted(float(p) for p in params["data.dataset.correlation"].split(",")) == [0.5, 0.9, 1.0]
    assert set(params["model"].split(",")) == {"shared_bottom", "omoe", "mmoe"}
    assert len(params["seed"].split(",")) >= 5
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.model.num_experts == 8 and cfg.model.expert_hidden_features == 16
    assert list(cfg.model.tower_layer_sizes) == [8] and cfg.data.dataset.dim == 100


def test_summary_table(tmp_path):
    for model, p, seed, mse in [("mmoe", 1.0, 0, 0.1), ("mmoe", 1.0, 1, 0.3), ("mmoe", 0.5, 0, 0.2)]:
        d = tmp_path / f"{model}{p}{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"domain": "recsys", "model": model, "router": "dense",
                                                    "data": "synthetic", "data_info": {"correlation": p},
                                                    "test_mse_mean": mse}))
    text = table(collect([str(tmp_path)]))
    assert "| mmoe | dense | 0.2000 ± 0.1414 (n=2) | 0.2000 ± 0.0000 (n=1) |" in text


def test_sweep_over_every_router_gives_na_rows_for_routers_that_cannot_gate(tmp_path):
    """``-m +router=hash,topk``: hash gets an n/a metrics.json (it needs token ids), topk trains."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "recsys.train", "-m", "+router=hash,topk", "model=mmoe", "data=synthetic",
         "debug=default", "trainer.max_steps=4", "data.limit_train=256", f"hydra.sweep.dir={tmp_path}",
         "hydra.sweep.subdir=${hydra:runtime.choices.router}"],
        capture_output=True, text=True, cwd=CONF_DIR.parent, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    hashed = json.loads((tmp_path / "hash" / "metrics.json").read_text())
    assert hashed["status"] == "n/a" and "token ids" in hashed["reason"]
    topk = json.loads((tmp_path / "topk" / "metrics.json").read_text())
    assert topk["router"] == "topk" and topk["test_mse_mean"] > 0
    text = table(collect([str(tmp_path)]))
    assert "| mmoe | topk |" in text and "mmoe / hash" in text
