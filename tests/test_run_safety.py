"""A run directory belongs to one run (core.rundir, through core.run):

1. re-running a command in a directory that holds another run's work without ``trainer.resume`` is
   refused, and that work is left as it was;
2. a second process cannot write into a directory in use (an advisory lock, released on any exit);
3. resuming with a config that changes the model, the data, the optimisation or the seed is refused
   naming the keys; safe changes (the step limit) are allowed and recorded;
and asking to resume when no checkpoint is readable names each file and touches nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.rundir import RunLock, changed_keys
from core.run import run, train
from tests.conftest import CONF_DIR, compose

RUN = ["debug=default", "trainer.max_steps=6", "trainer.checkpoint_every_steps=3"]


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Content hash of every file a run wrote (Hydra's own files aside)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and ".hydra" not in p.parts and p.name != ".lock"}


def _refused(run_dir: Path, *overrides: str, capsys) -> str:
    cfg = compose("vision", *RUN, f"output_dir={run_dir}", *overrides)
    with pytest.raises(SystemExit) as exc:
        run(cfg, _vision())
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _vision():
    from vision.train import VisionTask

    return VisionTask()


@pytest.fixture
def finished_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    train(compose("vision", *RUN, f"output_dir={run_dir}"))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    return run_dir


def test_a_new_run_refuses_a_directory_with_another_runs_work(finished_run, capsys):
    before = _snapshot(finished_run)
    line = _refused(finished_run, "trainer.max_steps=3", capsys=capsys)
    assert "holds an earlier run" in line and "trainer.resume=true" in line and "hydra.run.dir" in line
    assert _snapshot(finished_run) == before  # history, checkpoints, metrics and config untouched


def test_a_second_process_cannot_write_into_a_directory_in_use(tmp_path):
    run_dir = tmp_path / "busy"
    with RunLock(run_dir):  # this process holds the directory, as a running training would
        env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
        res = subprocess.run([sys.executable, "-m", "vision.train", *RUN, f"hydra.run.dir={run_dir}"],
                             cwd=CONF_DIR.parent, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "another run is writing into this directory" in res.stderr and f"pid {os.getpid()}" in res.stderr
        assert not (run_dir / "metrics.json").exists() and not (run_dir / "history.jsonl").exists()
    # the lock went with its holder: a lock file left behind by a dead process does not block
    (run_dir / ".lock").write_text("pid 999999 on nowhere since 2020-01-01: killed\n")
    with RunLock(run_dir):
        pass


def test_resuming_with_a_changed_model_or_optimisation_is_refused(finished_run, capsys):
    before = _snapshot(finished_run)
    line = _refused(finished_run, "trainer.resume=true", "+router=expert_choice", capsys=capsys)
    assert "the config differs from the checkpoint's" in line and "router._target_" in line
    line = _refused(finished_run, "trainer.resume=true", "trainer.lr=0.01", capsys=capsys)
    assert "trainer.lr: 0.002 -> 0.01" in line
    line = _refused(finished_run, "trainer.resume=true", "seed=1", capsys=capsys)
    assert "seed: 0 -> 1" in line
    assert _snapshot(finished_run) == before


def test_a_safe_change_on_resume_is_allowed_and_recorded(finished_run):
    cfg = compose("vision", *RUN, f"output_dir={finished_run}", "trainer.resume=true", "trainer.max_steps=9")
    metrics = train(cfg)
    assert metrics["steps"] == 9 and metrics["resume_changes"] == {"trainer.max_steps": [6, 9]}
    saved = json.loads((finished_run / "metrics.json").read_text())
    assert saved["resume_changes"] == {"trainer.max_steps": [6, 9]}


def test_resuming_without_a_readable_checkpoint_names_each_file_and_touches_nothing(finished_run, capsys):
    ckpts = finished_run / "checkpoints"
    for name in ("last.ckpt", "prev.ckpt"):
        (ckpts / name).write_bytes((ckpts / name).read_bytes()[:100])  # truncated, as by a full disk
    before = _snapshot(finished_run)
    line = _refused(finished_run, "trainer.resume=true", capsys=capsys)
    assert "no readable checkpoint" in line and "last.ckpt" in line and "prev.ckpt" in line
    assert _snapshot(finished_run) == before
    empty = finished_run.parent / "empty"
    line = _refused(empty, "trainer.resume=true", capsys=capsys)
    assert "last.ckpt: no such file" in line
    assert not (empty / "config.yaml").exists()


def test_changed_keys_lists_every_differing_leaf():
    old = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "e": {}}
    new = {"a": 1, "b": {"c": 3, "d": [1, 2], "f": 0}, "e": {}}
    assert changed_keys(old, new) == {"b.c": (2, 3), "b.f": (None, 0)}


# ------------------------------------------------------------------------------------- a full disk


def _disk_full_on(monkeypatch, suffix: str):
    """``os.fsync`` fails with ENOSPC for files whose name ends in ``suffix`` (as a full disk does)."""
    import errno

    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_previous_checkpoint(finished_run, monkeypatch,
                                                                                       capsys):
    from core.engine import load_checkpoint

    last = finished_run / "checkpoints" / "last.ckpt"
    step_before = load_checkpoint(last)["state"]["step"]
    _disk_full_on(monkeypatch, "last.ckpt.tmp")
    cfg = compose("vision", *RUN, f"output_dir={finished_run}", "trainer.resume=true", "trainer.max_steps=9")
    with pytest.raises(SystemExit) as exc:
        run(cfg, _vision())
    assert exc.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "last.ckpt is intact" in lines[0], lines
    assert load_checkpoint(last)["state"]["step"] == step_before
    assert not list(finished_run.rglob("*.tmp"))


def test_a_full_disk_while_writing_the_model_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    _disk_full_on(monkeypatch, "model.pt.tmp")
    cfg = compose("vision", *RUN, f"output_dir={tmp_path}", "trainer.checkpoint=false")
    with pytest.raises(SystemExit) as exc:
        run(cfg, _vision())
    assert exc.value.code == 1
    assert "writing" in capsys.readouterr().err and not (tmp_path / "model.pt").exists()
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------ memory, before it is used


def test_a_model_too_large_to_train_is_refused_with_its_estimate(tmp_path, monkeypatch, capsys):
    import core.memory

    monkeypatch.setattr(core.memory, "available_bytes", lambda device="cpu": 512 * 1024)  # a 512 KiB machine (the experts alone fit)
    line = _refused(tmp_path / "big", capsys=capsys)
    assert "training the model" in line and "would need" in line and "512.0 KiB" in line, line
    assert not (tmp_path / "big" / "history.jsonl").exists()
