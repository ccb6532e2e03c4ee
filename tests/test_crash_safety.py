"""Runs survive crashes and numerical faults.

- A checkpoint holds everything a resumed run needs: model (with router buffers such as DeepSeek's
  bias), optimizer, scheduler, the torch/NumPy/Python RNG states, the data position and the step;
  a run resumed from it ends exactly where the uninterrupted run ends.
- Checkpoints are written atomically: a crash while writing leaves the previous file intact; a
  truncated or corrupt file is reported and the previous good one is used.
- A real training process (nlp debug config) killed with SIGKILL mid-epoch and resumed with
  ``trainer.resume=true`` ends with the uninterrupted run's metrics.
- A non-finite loss stops the run naming the step and the term, and no non-finite checkpoint is
  ever written; ``trainer.skip_nonfinite=true`` skips such steps and finishes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import core.engine as engine
from core.engine import NonFiniteLossError, find_checkpoint, load_checkpoint, save_checkpoint
from core.routers.deepseek import DeepSeekRouter
from tests.conftest import CONF_DIR, compose, kill_at_first_checkpoint
from tests.core.test_engine import FINAL, TinyMoENet, fit, loss_fn

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = CONF_DIR.parent
DEEPSEEK = functools.partial(DeepSeekRouter, top_k=2, bias_update_rate=0.05)
BIAS = "moe.router.expert_bias_E"


class _Crash(Exception):
    """Stands for the process dying (the engine does not catch it)."""


def crash_at(call: int, loss=loss_fn):
    """A loss function that dies on its ``call``-th call (step ``call - 1``)."""
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise _Crash
        return loss(model, batch)

    return crashing


def _final(metrics: dict) -> dict:
    return {k: metrics[k] for k in FINAL}


# --------------------------------------------------------------------------------- checkpoint content


def test_checkpoint_holds_model_optimizer_scheduler_rng_position_and_router_buffers(tmp_path):
    with pytest.raises(_Crash):  # 16 examples a batch, 6 batches an epoch: the step-8 checkpoint is mid epoch 1
        fit(tmp_path, model=TinyMoENet(router=DEEPSEEK), loss=crash_at(11))
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (ck["state"]["epoch"], ck["state"]["batch"], ck["state"]["step"]) == (1, 2, 8)
    assert BIAS in ck["model"] and ck["model"][BIAS].abs().sum() > 0, "DeepSeek's bias was not saved (or never moved)"
    assert ck["optimizer"]["state"] and all("exp_avg" in s for s in ck["optimizer"]["state"].values())
    assert ck["scheduler"]["last_epoch"] == 8
    assert set(ck["rng"]) >= {"python", "numpy", "torch"}
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_deepseek_run_resumed_mid_way_equals_the_uninterrupted_run(tmp_path):
    ref, ref_model = fit(tmp_path / "ref", model=TinyMoENet(router=DEEPSEEK))
    with pytest.raises(_Crash):
        fit(tmp_path / "run", model=TinyMoENet(router=DEEPSEEK), loss=crash_at(11))
    resumed, model = fit(tmp_path / "run", model=TinyMoENet(router=DEEPSEEK), resume=True)
    assert _final(resumed) == _final(ref)
    torch.testing.assert_close(model.moe.router.expert_bias_E, ref_model.moe.router.expert_bias_E, rtol=0, atol=0)

    # the bias is restored from the checkpoint: resuming from one whose bias was reset ends elsewhere
    with pytest.raises(_Crash):
        fit(tmp_path / "reset", model=TinyMoENet(router=DEEPSEEK), loss=crash_at(11))
    last = tmp_path / "reset" / "checkpoints" / "last.ckpt"
    ck = load_checkpoint(last)
    ck["model"][BIAS].zero_()
    last.unlink()
    save_checkpoint(last, ck)
    _, reset = fit(tmp_path / "reset", model=TinyMoENet(router=DEEPSEEK), resume=True)
    assert not torch.equal(reset.moe.router.expert_bias_E, ref_model.moe.router.expert_bias_E)


def _noisy_loss(model, batch):
    """Input noise drawn from all three generators: a resumed run matches only if each is restored."""
    x, y = batch
    scale = 0.5 * random.random() + float(np.random.rand())
    return loss_fn(model, (x + scale * torch.randn_like(x), y))


def test_rng_states_are_restored_on_resume(tmp_path):
    ref, _ = fit(tmp_path / "ref", loss=_noisy_loss)
    with pytest.raises(_Crash):
        fit(tmp_path / "run", loss=crash_at(11, _noisy_loss))
    resumed, _ = fit(tmp_path / "run", loss=_noisy_loss, resume=True)
    assert _final(resumed) == _final(ref)
    # and the check has teeth: fresh generators after the checkpoint change the result
    with pytest.raises(_Crash):
        fit(tmp_path / "fresh", loss=crash_at(11, _noisy_loss))
    last = tmp_path / "fresh" / "checkpoints" / "last.ckpt"
    ck = load_checkpoint(last)
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    ck["rng"] = engine.rng_state()
    last.unlink()
    save_checkpoint(last, ck)
    fresh, _ = fit(tmp_path / "fresh", loss=_noisy_loss, resume=True)
    assert fresh["test_loss"] != ref["test_loss"]


# ------------------------------------------------------------------------------ atomic, corrupt files


def test_a_crash_while_writing_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint(path, {"step": 1})

    def power_cut(fd):
        raise OSError("simulated crash before the data reached the disk")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 1
    assert not path.with_name("prev.ckpt").exists()


def test_corrupt_last_checkpoint_is_reported_and_the_previous_one_resumes(tmp_path, caplog):
    fit(tmp_path / "ref")
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    with pytest.raises(_Crash):
        fit(tmp_path / "run", loss=crash_at(11))  # checkpoints at steps 4, 6 (end of epoch 0), 8
    ckdir = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ckdir / "last.ckpt")["state"]["step"] == 8
    assert load_checkpoint(ckdir / "prev.ckpt")["state"]["step"] == 6
    raw = (ckdir / "last.ckpt").read_bytes()
    (ckdir / "last.ckpt").write_bytes(raw[: len(raw) * 2 // 3])  # cut short by a crash
    with caplog.at_level(logging.INFO, logger="core.engine"):
        resumed, _ = fit(tmp_path / "run", resume=True)
    text = caplog.text
    assert "last.ckpt is unreadable" in text and "corrupt or truncated" in text
    assert "resumed from" in text and "prev.ckpt" in text and "step 6" in text
    assert _final(resumed) == {k: ref[k] for k in FINAL}


def test_garbage_instead_of_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="checksum file last.ckpt.sha256 is missing"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="no readable checkpoint"):
        find_checkpoint(str(bad), tmp_path)
    engine.checksum_path(bad).write_text(hashlib.sha256(bad.read_bytes()).hexdigest() + "  last.ckpt\n")
    with pytest.raises(ValueError, match="not a checkpoint"):  # the checksum matches, torch.load does not
        load_checkpoint(bad)


# ---------------------------------------------------------------------------------- numerical faults


def _nan_at(step: int, make_bad):
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == step + 1:
            make_bad(model)
        value, logs = loss_fn(model, batch)
        if calls["n"] == step + 1 and make_bad is _nan_loss:
            value = value * float("nan")
        return value, logs

    return loss


def _nan_loss(model):
    pass


def _inf_weight(model):
    with torch.no_grad():
        model.out.weight[0, 0] = float("inf")


def _all_finite(ck) -> bool:
    return all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("make_bad,term", [(_nan_loss, "task loss=nan"), (_inf_weight, "task loss=(nan|inf)")],
                         ids=["nan-loss", "inf-parameter"])
def test_non_finite_loss_stops_naming_step_and_term_and_writes_no_bad_checkpoint(tmp_path, make_bad, term):
    with pytest.raises(NonFiniteLossError, match=rf"at step 9 \(epoch 1, batch 3\): {term}\..*skip_nonfinite"):
        fit(tmp_path, loss=_nan_at(9, make_bad))
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ck["state"]["step"] == 8 and _all_finite(ck)
    assert not (tmp_path / "metrics.json").exists()


class _Unused(TinyMoENet):
    def __init__(self):
        super().__init__()
        self.spare = nn.Parameter(torch.zeros(2))  # outside the loss: only the checkpoint guard sees it


def test_a_non_finite_parameter_is_never_checkpointed(tmp_path):
    def poison(model):
        with torch.no_grad():
            model.spare[0] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"parameter spare is not finite at step 6: checkpoint not written"):
        fit(tmp_path, model=_Unused(), loss=_nan_at(5, poison))  # the end-of-epoch checkpoint (step 6) refuses
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ck["state"]["step"] == 4 and _all_finite(ck)


def test_skip_nonfinite_skips_the_bad_step_and_finishes(tmp_path):
    metrics, model = fit(tmp_path, loss=_nan_at(9, _nan_loss), skip_nonfinite=True)
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 18
    assert np.isfinite(metrics["test_loss"]) and all(torch.isfinite(p).all() for p in model.parameters())
    assert _all_finite(load_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))


# ------------------------------------------------------------------------------- SIGKILL, real process


NLP_ARGS = ["debug=default", "trainer.max_steps=60", "trainer.checkpoint_every_steps=10"]
NLP_FINAL = ("val_loss", "val_ppl", "load_cv2", "experts_per_token", "dropped_fraction", "steps", "params_active")


def test_killed_nlp_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL ``python -m nlp.train`` once its first in-epoch checkpoint exists; ``trainer.resume=true``
    in the same run directory ends with the metrics of a run that was never interrupted (computed
    in this process, on one thread as the subprocess)."""
    from core.run import train

    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nlp.train", *NLP_ARGS, f"hydra.run.dir={run_dir}"]
    ckpt = kill_at_first_checkpoint(cmd, run_dir, env, timeout_s=120)
    cfg = compose("nlp", *NLP_ARGS, f"output_dir={tmp_path / 'ref'}")
    step = load_checkpoint(ckpt)["state"]["step"] if ckpt.exists() else None
    assert step is not None and 10 <= step < 60

    ref = train(cfg)  # the uninterrupted run, meanwhile
    res = subprocess.run(cmd + ["trainer.resume=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["steps"] == 60
    assert {k: resumed[k] for k in NLP_FINAL} == {k: ref[k] for k in NLP_FINAL}


_VOLATILE = ("_per_s", "time_s", "finished_at", "machine", "resume", "run_dir")


def _comparable(metrics: dict) -> dict:
    """The metrics a resumed run must reproduce: everything but timings, dates and the machine."""
    return {k: v for k, v in metrics.items() if not any(word in k for word in _VOLATILE)}


@pytest.mark.parametrize("domain, args", [
    ("recsys", ["debug=default", "trainer.max_epochs=3", "trainer.checkpoint_every_steps=4"]),
    ("multimodal", ["debug=default", "trainer.max_epochs=2", "trainer.checkpoint_every_steps=6"]),
])
def test_killed_run_resumes_to_the_uninterrupted_result_in_recsys_and_multimodal(tmp_path, domain, args):
    """SIGKILL ``python -m <domain>.train`` once its first in-epoch checkpoint exists; ``trainer.resume=true``
    in the same run directory ends with every metric of a run that was never interrupted (vision and nlp:
    tests/vision/test_train.py and the test above)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    cmd = [sys.executable, "-m", f"{domain}.train", *args]
    ref = subprocess.run(cmd + [f"hydra.run.dir={ref_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ckpt = kill_at_first_checkpoint(cmd + [f"hydra.run.dir={run_dir}"], run_dir, env)
    assert 0 < load_checkpoint(ckpt)["state"]["step"]
    res = subprocess.run(cmd + [f"hydra.run.dir={run_dir}", "trainer.resume=true"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    a = json.loads((ref_dir / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["steps"] == b["steps"] and a[a["metric"]] == b[b["metric"]]
    assert _comparable(b) == _comparable(a)
