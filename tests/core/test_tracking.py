"""Experiment tracking (core.tracking): a debug run with ``logger=[csv,tensorboard]`` writes event files
that TensorBoard's own ``EventAccumulator`` reads back, with one scalar per expert per MoE layer that
matches the final evaluation in ``metrics.json``; the CSV file holds the same tags and values;
``routing.jsonl`` keeps every evaluation's per-layer load; W&B without its package is refused in one
line."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict

import pytest
from omegaconf import OmegaConf

from core.checks import ConfigError
from core.run import train
from core.tracking import CSVLogger, build_tracking, check_logger
from tests.conftest import compose

STEPS, LOG_EVERY, PER_EPOCH = 8, 2, 4   # 4 steps per epoch: two evaluations


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    cfg = compose("vision", "debug=default", "logger=[csv,tensorboard]", f"output_dir={out}",
                  f"trainer.max_steps={STEPS}", f"trainer.log_every_steps={LOG_EVERY}",
                  f"data.limit_train={PER_EPOCH * 32}", "data.limit_eval=64", "+threads=1")
    metrics = train(cfg)
    return out, metrics


def _events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _csv(out):
    rows = defaultdict(list)
    with open(out / "tracking.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows[r["tag"]].append((int(r["step"]), float(r["value"])))
    return rows


def test_tensorboard_holds_one_scalar_per_expert_matching_the_final_evaluation(run):
    out, metrics = run
    events = _events(out)
    layers = metrics["routing_layers"]
    assert layers, "the debug V-MoE has MoE layers"
    images, tokens_per_image = 64, 16       # data.limit_eval, 8x8 digits in 2x2 patches
    for layer, st in layers.items():
        E = len(st["tokens_per_expert"])
        last = []
        for e in range(E):
            series = events[f"moe/{layer}/tokens_per_expert/{e}"]
            assert [s for s, _ in series] == [PER_EPOCH, STEPS]          # every evaluation
            assert all(math.isfinite(v) and v >= 0 for _, v in series)
            last.append(series[-1][1])
        assert last == pytest.approx(st["tokens_per_expert"])
        # assignments over experts: every token's kept choices
        assert sum(last) == pytest.approx(images * tokens_per_image * st["experts_per_token"])
        assert sum(last) <= images * tokens_per_image * 2               # top-2
        for key in ("load_cv2", "dropped_fraction", "entropy"):
            assert events[f"moe/{layer}/{key}"][-1][1] == pytest.approx(st[key])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/examples_per_s"):
        assert [s for s, _ in events[tag]] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), tag
        assert all(math.isfinite(v) for _, v in events[tag])
    assert events["test/acc"][-1][1] == pytest.approx(metrics["test_acc"])
    assert events["test/routing/load_cv2"][-1][1] == pytest.approx(metrics["load_cv2"])


def test_csv_holds_the_same_tags_and_values(run):
    out, _ = run
    events, rows = _events(out), _csv(out)
    assert set(rows) == set(events)
    for tag, series in events.items():
        assert [s for s, _ in rows[tag]] == [s for s, _ in series], tag
        assert [v for _, v in rows[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag


def test_routing_history_keeps_every_evaluation_and_training_interval(run):
    out, metrics = run
    lines = [json.loads(x) for x in (out / "routing.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["split"] == "test"]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in evals] == [PER_EPOCH, STEPS]
    assert evals[-1]["layers"] == metrics["routing_layers"]
    assert [r["step"] for r in train_lines] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    # each interval's assignments: LOG_EVERY batches of 32 images x 16 patches, up to 2 experts each
    for r in train_lines:
        for st in r["layers"].values():
            assert 0 < sum(st["tokens_per_expert"]) <= LOG_EVERY * 32 * 16 * 2


def test_routing_sample_is_written(run):
    out, _ = run
    sample = json.loads((out / "routing_sample.json").read_text())
    layer = next(iter(sample["layers"].values()))
    assert layer["shape"] == [8, 16] and len(layer["top_expert"]) == 8
    assert {e for row in layer["top_expert"] for e in row} <= set(range(-1, layer["num_experts"]))
    assert len(sample["images"]) == 8


def test_csv_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    log = CSVLogger(tmp_path)
    log.log_scalars({"a": 1.0}, 2)
    log.log_scalars({"a": 2.0}, 4)
    log.close()
    log = CSVLogger(tmp_path, resume_step=2)
    log.log_scalars({"a": 3.0}, 4)
    log.close()
    assert _csv(tmp_path)["a"] == [(2, 1.0), (4, 3.0)]


def test_logger_choices_compose():
    assert set(compose("nlp").logger) == {"csv"}
    assert set(compose("recsys", "logger=[csv,tensorboard]").logger) == {"csv", "tensorboard"}
    assert compose("multimodal", "logger=[]").get("logger") is None
    tracking = build_tracking(compose("vision", "logger=tensorboard").logger)
    assert set(tracking.factories) == {"tensorboard"}


def test_wandb_without_its_package_is_a_config_error():
    node = compose("vision", "logger=wandb").logger
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="wandb package is not installed: pip install wandb"):
            check_logger(node)
    else:
        check_logger(node)
        assert node.wandb.mode == "offline"


def test_a_logger_that_is_not_a_backend_node_is_refused():
    with pytest.raises(ConfigError, match="logger.csv"):
        check_logger(OmegaConf.create({"csv": "yes"}))
