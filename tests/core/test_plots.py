"""core.plots: the figures of a tiny run (learning curves, expert load, token→expert map, drop rate by
position) as non-empty PNGs with the expected names; the map a domain's records call for (image
patches, text tokens, modality split, task gates); a directory without records refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.plots import FIGURES, draw_run, main
from core.run import train
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plotted")
    cfg = compose("vision", "debug=default", "logger=[]", "plots=true", f"output_dir={out}", "trainer.max_steps=6",
                  "trainer.log_every_steps=2", "data.limit_train=128", "data.limit_eval=64", "+threads=1")
    train(cfg)
    return out


def test_a_run_with_plots_writes_every_figure(vision_run):
    written = sorted(p.name for p in (vision_run / "plots").iterdir())
    assert written == sorted(FIGURES)
    for name in FIGURES:
        w, h = _png_size(vision_run / "plots" / name)
        assert w >= 300 and h >= 200, (name, w, h)
    assert not (vision_run / "tensorboard").exists() and not (vision_run / "tracking.csv").exists()  # logger=[]


def test_the_command_line_draws_into_out(vision_run, tmp_path, capsys):
    assert main([str(vision_run), "--out", str(tmp_path / "figs")]) == 0
    printed = [Path(line).name for line in capsys.readouterr().out.splitlines()]
    assert printed == list(FIGURES)
    assert all((tmp_path / "figs" / name).stat().st_size > 5000 for name in FIGURES)


def test_a_directory_without_records_is_refused_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "core.plots", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "history.jsonl" in lines[0], res.stderr
    assert not (tmp_path / "plots").exists()


def _fake_run(tmp_path: Path, metrics: dict, sample: dict, analysis: dict | None = None) -> Path:
    (tmp_path / "metrics.json").write_text(json.dumps({"domain": "x", "model": "m", "router": "r", **metrics}))
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "epoch": 0, "loss": 2.0, "task_loss": 2.0, "lr": 1e-3, "grad_norm": 1.0},
        {"step": 2, "epoch": 0, "end_of_epoch": True, "train_loss": 1.5, "val_loss": 1.4,
         "val_gates": {"g0": {"importance": [0.7, 0.3]}, "g1": {"importance": [0.2, 0.8]}}})))
    (tmp_path / "routing_sample.json").write_text(json.dumps(sample))
    if analysis is not None:
        (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    return tmp_path


def test_text_tokens_and_the_analysis_drop_rate(tmp_path):
    layer = {"shape": [2, 4], "num_experts": 3, "top_expert": [[0, 1, 2, -1], [2, 2, 1, 0]]}
    run = _fake_run(tmp_path, {"metric": "val_ppl"},
                    {"layers": {"blocks.0.ffn": layer, "blocks.1.ffn": layer}, "gates": {},
                     "tokens": [list("abcd"), list("efgh")]},
                    {"drop_rate_by_position": {"capacity_factor": 1.0, "router_capacity_factor": None,
                                               "no_bpr": {"per_position": [0.0, 0.1, 0.2, 0.4]}}})
    names = [p.name for p in draw_run(run)]
    assert names == ["learning_curves.png", "expert_load.png", "token_expert_map.png", "drop_rate_by_position.png"]


def test_task_gates_without_positions_have_no_drop_figure(tmp_path):
    run = _fake_run(tmp_path, {"tasks": {"income": "binary", "married": "binary"}},
                    {"layers": {}, "gates": {"g0": [[0.7, 0.3], [0.6, 0.4]], "g1": [[0.1, 0.9], [0.2, 0.8]]}})
    names = [p.name for p in draw_run(run, tmp_path / "out")]
    assert names == ["learning_curves.png", "expert_load.png", "token_expert_map.png"]


def test_a_flat_joint_group_gets_expert_shares_and_no_positions(tmp_path):
    """LIMoE routes a batch's image and text tokens as one flat group: no patch grid, no positions."""
    flat = {"shape": [1, 6], "num_experts": 2, "top_expert": [[0, 1, 1, 0, 1, 1]], "dropped": [[0, 0, 1, 0, 0, 1]]}
    run = _fake_run(tmp_path, {}, {"layers": {"transformer.resblocks.1.mlp": flat}, "gates": {},
                                   "images": [[[[0.0, 1.0], [1.0, 0.0]]]] * 2})
    names = [p.name for p in draw_run(run)]
    assert names == ["learning_curves.png", "expert_load.png", "token_expert_map.png"]
