"""The checkpoint file is a plain ``torch.save`` file (``torch.load`` reads it, ``weights_only=True``
included) with a ``.sha256`` sidecar: a changed byte or a missing sidecar is detected, a crash at any
point of the write leaves one verified checkpoint, and files of the earlier single-file format load."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch

from core.engine import checksum_path, find_checkpoint, is_training_checkpoint, load_checkpoint, save_checkpoint
from tests.core.test_engine import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_engine_checkpoint_is_read_by_torch_load(tmp_path):
    fit(tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ck = torch.load(last, weights_only=True)  # torch's safe default: tensors and plain containers only
    assert set(ck) >= {"model", "optimizer", "scheduler", "rng", "state"} and ck["state"]["step"] > 0
    verified = load_checkpoint(last)["model"]
    assert ck["model"].keys() == verified.keys() and all(torch.equal(ck["model"][k], verified[k]) for k in verified)
    digest, name = checksum_path(last).read_text().split()
    assert name == "last.ckpt" and digest == hashlib.sha256(last.read_bytes()).hexdigest()
    prev = last.with_name("prev.ckpt")
    assert checksum_path(prev).read_text().split() == [hashlib.sha256(prev.read_bytes()).hexdigest(), "prev.ckpt"]
    model_pt = tmp_path / "run" / "model.pt"
    if model_pt.exists():  # the final weights stay a plain state dict
        assert all(isinstance(v, torch.Tensor) for v in torch.load(model_pt, weights_only=True).values())
        assert not is_training_checkpoint(model_pt)
    assert is_training_checkpoint(last)


def test_a_changed_byte_or_a_missing_sidecar_is_corruption(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint(path, {"state": 1, "w": torch.arange(100.0)})
    save_checkpoint(path, {"state": 2, "w": torch.arange(100.0)})
    good = path.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    assert find_checkpoint(True, tmp_path)[1]["state"] == 1
    path.write_bytes(good)
    checksum_path(path).unlink()
    with pytest.raises(ValueError, match="checksum file last.ckpt.sha256 is missing"):
        load_checkpoint(path)
    found, ck = find_checkpoint(True, tmp_path)
    assert found.name == "prev.ckpt" and ck["state"] == 1


@pytest.mark.parametrize("crash_at", range(5))
def test_a_crash_at_any_step_of_the_write_leaves_a_verified_checkpoint(tmp_path, monkeypatch, crash_at):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint(path, {"state": 1})
    save_checkpoint(path, {"state": 2})
    real_replace, calls = os.replace, {"n": 0}

    def replace(src, dst):  # the process dies before the crash_at-th rename
        if calls["n"] == crash_at:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        save_checkpoint(path, {"state": 3})
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    found, ck = find_checkpoint(True, tmp_path)
    assert ck["state"] in (2, 3)
    assert (ck["state"] == 3) == (crash_at == 4), (crash_at, found, ck)
    if path.exists():  # a last.ckpt that exists always has its checksum
        load_checkpoint(path)


def test_a_checkpoint_of_the_earlier_format_still_loads(tmp_path):
    buf = io.BytesIO()
    torch.save({"state": {"step": 7}}, buf)
    data = buf.getvalue()
    old = tmp_path / "checkpoints" / "last.ckpt"
    old.parent.mkdir()
    old.write_bytes(b"MOECKPT1" + hashlib.sha256(data).digest() + data)
    assert is_training_checkpoint(old) and load_checkpoint(old)["state"]["step"] == 7
    save_checkpoint(old, {"state": {"step": 8}})  # the old file becomes prev.ckpt, still verifiable
    assert load_checkpoint(old)["state"]["step"] == 8
    assert load_checkpoint(old.with_name("prev.ckpt"))["state"]["step"] == 7
    old.with_name("prev.ckpt").write_bytes(b"MOECKPT1" + hashlib.sha256(data).digest() + data[:-3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(old.with_name("prev.ckpt"))
