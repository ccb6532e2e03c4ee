"""vision.train: the composed Hydra config end to end (debug overlay: digits, a tiny V-MoE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.run import check_config, router_label, summary, train, with_default_router
from vision.train import VisionTask, build_model
from tests.conftest import kill_at_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
FINAL = ("test_acc", "test_loss", "load_cv2", "importance_cv2", "dropped_fraction", "experts_per_token", "steps")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "vision.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


DIGITS = type("D", (), {"img_size": 8, "in_chans": 1, "num_classes": 10})()


def router_name(cfg) -> str:
    default = with_default_router(cfg)
    return router_label(cfg, build_model(cfg, DIGITS), VisionTask(), default)


def test_debug_run_writes_metrics_naming_its_router(vision_cfg, tmp_path):
    metrics = train(vision_cfg())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["domain"] == "vision" and saved["router"] == "topk" and saved["dataset"] == "digits"
    assert saved["moe_blocks"] == [1] and saved["num_experts"] == 4
    assert 0 <= saved["test_acc"] <= 1 and saved["examples_per_s"] > 0
    assert saved["params_active"] < saved["params_total"]
    assert saved["load_cv2"] is not None and 0 <= saved["dropped_fraction"] < 1
    assert (tmp_path / "history.jsonl").is_file() and (tmp_path / "config.yaml").is_file()
    text = summary({**saved, "run_dir": tmp_path}, VisionTask())
    assert "test accuracy" in text and "images/s" in text and "CV²" in text and "active" in text
    assert text.splitlines()[-1].split() == ["run", "directory", str(tmp_path)]


def test_router_override_and_dense_baseline(vision_cfg):
    cfg = vision_cfg("+router=expert_choice")
    assert router_name(cfg) == "expert_choice"
    model = build_model(cfg, DIGITS)
    assert type(model.blocks[1].mlp.router).__name__ == "ExpertChoiceRouter"
    dense_cfg = vision_cfg("model.moe=false", "trainer.max_steps=3")
    assert router_name(dense_cfg) == "none"
    metrics = train(dense_cfg)
    assert metrics["router"] == "none" and metrics["params_active"] == metrics["params_total"]
    assert metrics["load_cv2"] is None
    assert vision_cfg("model=vit_tiny").model.moe is False


def test_same_seed_same_metrics(vision_cfg, tmp_path):
    a = train(vision_cfg("trainer.max_steps=12", f"output_dir={tmp_path / 'a'}"))
    b = train(vision_cfg("trainer.max_steps=12", f"output_dir={tmp_path / 'b'}"))
    assert {k: a[k] for k in FINAL} == {k: b[k] for k in FINAL}


@pytest.mark.parametrize("override,message", [
    ("model.name=vmoe_huge", r"model.name='vmoe_huge' is not allowed: use one of \[.*vmoe_tiny_patch4_28"),
    ("model.placement=sometimes", r"model.placement='sometimes'.*every_other"),
    ("data.augment=rotate", r"data.augment='rotate'.*crop_flip"),
    ("data.name=mnist3d", r"data.name='mnist3d'.*digits"),
    ("data.batch_size=0", r"data.batch_size=0"),
    ("trainer.lr=-0.1", r"trainer.lr=-0.1"),
    ("trainer.device=tpu", r"trainer.device='tpu'.*auto, cpu, cuda"),
    ("+trainer.epochs=3", r"trainer.epochs=3 is not allowed: it is not a trainer key"),
])
def test_bad_config_is_refused_before_training(vision_cfg, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        check_config(vision_cfg(override), VisionTask())
    assert not (tmp_path / "history.jsonl").exists()


def test_bad_router_value_names_the_router(vision_cfg):
    with pytest.raises(ValueError, match=r"router.top_k=9 is not allowed"):
        train(vision_cfg("+router=topk", "router.top_k=9"))


def test_cli_bad_config_is_one_clear_line(tmp_path):
    res = _cli("model.name=bogus", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2
    assert "model.name='bogus' is not allowed" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_cli_multirun_names_each_router_and_marks_unusable_ones(tmp_path):
    res = _cli("-m", "+router=expert_choice,hash", "debug=default", "trainer.max_steps=3",
               f"hydra.sweep.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    runs = {m["router"]: m for m in (json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json"))}
    assert set(runs) == {"expert_choice", "hash"}
    assert runs["expert_choice"]["steps"] == 3 and "test_acc" in runs["expert_choice"]
    assert runs["hash"]["status"] == "n/a" and "needs token ids" in runs["hash"]["reason"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process after it wrote a checkpoint; ``trainer.resume=true`` in the
    same run directory ends with the metrics of a run that was never interrupted."""
    args = ["debug=default", "trainer.max_steps=null", "trainer.max_epochs=8", "trainer.checkpoint_every_steps=4"]
    ref = _cli(*args, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_dir = tmp_path / "run"
    kill_at_first_checkpoint([sys.executable, "-m", "vision.train", *args, f"hydra.run.dir={run_dir}"], run_dir,
                             dict(os.environ, OMP_NUM_THREADS="1"))
    res = _cli(*args, "trainer.resume=true", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["steps"] == 8 * 16
    assert {k: b[k] for k in FINAL} == {k: a[k] for k in FINAL}


@pytest.mark.slow
def test_cli_multirun_over_every_router(tmp_path):
    res = _cli("-m", "+router=glob(*)", "debug=default", "trainer.max_steps=4", f"hydra.sweep.dir={tmp_path}",
               timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    names = {json.loads(p.read_text())["router"] for p in tmp_path.glob("*/metrics.json")}
    assert names == {p.stem for p in (REPO / "conf" / "router").glob("*.yaml")}


def test_dense_run_weights_upcycle_into_a_vmoe(vision_cfg, tmp_path):
    train(vision_cfg("model.moe=false", "trainer.max_steps=3", f"output_dir={tmp_path / 'dense'}"))
    weights = tmp_path / "dense" / "model.pt"
    assert weights.is_file()
    import torch
    dense = torch.load(weights, weights_only=True)
    data = type("D", (), {"img_size": 8, "in_chans": 1, "num_classes": 10})()
    model = build_model(vision_cfg(f"model.upcycle_from={weights}"), data)
    experts = model.blocks[1].mlp.experts
    for e in range(experts.num_experts):
        torch.testing.assert_close(experts.w1_EDF[e], dense["blocks.1.mlp.fc1.weight"].t())
    torch.testing.assert_close(model.head.weight, dense["head.weight"])
