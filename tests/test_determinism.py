"""The same seed gives the same metrics on CPU, for every domain's debug config (``debug=default``):
two in-process runs from the composed config agree exactly on every metric that is not a clock
reading, and a different seed changes the result (so the comparison can fail).

Multimodal's debug config takes ~30 s a run on CPU; the default test shrinks it to the tests' micro
CLIP (8 steps), and the ``slow`` test runs it unshrunk.
"""

from __future__ import annotations

import math

import pytest

from core.run import train
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS = {"vision": "test_loss", "nlp": "val_loss", "recsys": "val_loss", "multimodal": "val_loss"}
MULTIMODAL_SMALL = ["model.model_name=mm-clip-micro-p4-16", "data.image_size=16", "trainer.max_steps=8",
                    "data.fashion_mnist_train=400", "data.limit_eval=64", "threads=1"]


def _is_clock(key: str) -> bool:
    return "per_s" in key or key.endswith(("time_s", "_at"))  # throughput, durations, timestamps


def _comparable(value):
    """The metrics without wall-clock readings (throughput, times), nested dicts included."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if not _is_clock(k)}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _run(domain: str, tmp_path, name: str, *overrides: str) -> dict:
    cfg = compose(domain, "debug=default", f"output_dir={tmp_path / name}", *overrides)
    return train(cfg)  # the domain's task, found by cfg.domain


def _check(domain: str, tmp_path, *overrides: str) -> None:
    a = _run(domain, tmp_path, "a", *overrides)
    b = _run(domain, tmp_path, "b", *overrides)
    assert a["steps"] > 0 and math.isfinite(a[LOSS[domain]])
    assert _comparable(a) == _comparable(b)
    c = _run(domain, tmp_path, "c", "seed=1", *overrides)
    assert c[LOSS[domain]] != a[LOSS[domain]], "another seed gave the same loss: the comparison has no teeth"


@pytest.mark.parametrize("domain", ["vision", "nlp", "recsys"])
def test_same_seed_same_metrics(domain, tmp_path):
    _check(domain, tmp_path)


def test_same_seed_same_metrics_multimodal_small(tmp_path):
    _check("multimodal", tmp_path, *MULTIMODAL_SMALL)


@pytest.mark.slow
def test_same_seed_same_metrics_multimodal_debug_config(tmp_path):
    _check("multimodal", tmp_path, "threads=1")
