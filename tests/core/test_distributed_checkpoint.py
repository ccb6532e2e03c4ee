"""Distributed checkpoints (``torch.distributed.checkpoint`` directories) keep the guarantees of the
checkpoint file: the previous one survives a failed save, a changed or missing file is detected and
the previous one is used, and ``find_checkpoint`` takes the newer of a file and a directory. One
process here (``dcp`` needs no process group); the multi-rank runs are in tests/test_distributed_train.py."""

from __future__ import annotations

import os

import pytest
import torch

from core.engine.checkpoint import (MANIFEST, STATE_FILE, find_checkpoint, load_distributed_tensors,
                                    save_checkpoint, save_distributed_checkpoint, verify_distributed_checkpoint)
from core.engine.records import WriteError

# dcp says once per call that it runs without a process group: here that is the point
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _save(path, value: float, step: int) -> None:
    tensors = {"model": {"w": torch.full((3, 2), value)}, "optimizer": {"state": {"w": {"exp_avg": torch.ones(3, 2)}}}}
    save_distributed_checkpoint(path, tensors, {"state": {"step": step}}, is_main=True)


def _load(path) -> torch.Tensor:
    tensors = {"model": {"w": torch.zeros(3, 2)}, "optimizer": {"state": {"w": {"exp_avg": torch.zeros(3, 2)}}}}
    load_distributed_tensors(path, tensors)
    return tensors["model"]["w"]


def test_save_writes_a_verified_directory_and_keeps_the_previous(tmp_path):
    last = tmp_path / "checkpoints" / "last.dcp"
    _save(last, 1.0, 10)
    _save(last, 2.0, 20)
    prev = last.with_name("prev.dcp")
    assert (last / ".metadata").is_file() and (last / MANIFEST).is_file() and (last / STATE_FILE).is_file()
    assert verify_distributed_checkpoint(last)["state"]["step"] == 20
    assert verify_distributed_checkpoint(prev)["state"]["step"] == 10
    assert torch.equal(_load(last), torch.full((3, 2), 2.0)) and torch.equal(_load(prev), torch.full((3, 2), 1.0))
    assert not last.with_name("last.dcp.tmp").exists()


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last.dcp"
    _save(last, 1.0, 10)
    import torch.distributed.checkpoint as dcp

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(WriteError, match="last.dcp failed.*No space left.*previous last.dcp is intact"):
        _save(last, 2.0, 20)
    assert verify_distributed_checkpoint(last)["state"]["step"] == 10
    assert not last.with_name("last.dcp.tmp").exists()


@pytest.mark.parametrize("damage", ["changed", "missing", "no_manifest"])
def test_a_damaged_directory_is_detected_and_the_previous_one_used(tmp_path, damage):
    ckpts = tmp_path / "checkpoints"
    _save(ckpts / "last.dcp", 1.0, 10)
    _save(ckpts / "last.dcp", 2.0, 20)
    last = ckpts / "last.dcp"
    data = sorted(last.glob("*.distcp"))[0]
    if damage == "changed":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "missing":
        data.unlink()
    else:
        (last / MANIFEST).unlink()
    with pytest.raises(ValueError, match={"changed": "corrupt", "missing": "missing", "no_manifest": MANIFEST}[damage]):
        verify_distributed_checkpoint(last)
    path, state = find_checkpoint(True, tmp_path)
    assert path == ckpts / "prev.dcp" and state["state"]["step"] == 10 and state["format"] == "dcp"


def test_the_newer_of_a_file_and_a_directory_is_resumed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _save(ckpts / "last.dcp", 1.0, 10)
    save_checkpoint(ckpts / "last.ckpt", {"state": {"step": 30}})
    os.utime(ckpts / "last.dcp", (1, 1))  # the directory is older
    path, ck = find_checkpoint(True, tmp_path)
    assert path.name == "last.ckpt" and ck["state"]["step"] == 30
    os.utime(ckpts / "last.ckpt", (0, 0))
    path, ck = find_checkpoint(True, tmp_path)
    assert path.name == "last.dcp" and ck["state"]["step"] == 10
    # a path to the directory itself resumes that directory
    path, ck = find_checkpoint(str(ckpts / "last.dcp"), tmp_path / "elsewhere")
    assert path == ckpts / "last.dcp"
