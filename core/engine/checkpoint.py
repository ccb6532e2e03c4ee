"""Checkpoint files and the generator states they hold.

A checkpoint file is ``MOECKPT1`` + the SHA-256 of the payload + the payload (``torch.save``), written
to a temporary file, fsynced and renamed over ``last.ckpt``, the previous one kept as ``prev.ckpt``:
a crash mid-write leaves a readable checkpoint, and a damaged one is detected and skipped. What the
payload holds (model, optimizer, scheduler, RNG states, ``TrainState``) is the loop's business
(``Trainer._save``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from pathlib import Path

import numpy as np
import torch

# one logger for the whole engine: log lines keep the name (``core.engine``) they had in one module
log = logging.getLogger(__package__)

_MAGIC = b"MOECKPT1"


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a checksummed temporary file, fsync, then ``os.replace``; the previous
    ``last`` becomes ``prev`` so that one good checkpoint always survives a crash mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from core.engine.records import write_atomic

    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    write_atomic(path, lambda f: f.write(_MAGIC + hashlib.sha256(data).digest() + data),
                 keep_previous=path.with_name("prev" + path.suffix))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; raises ``ValueError`` if it is truncated or corrupt."""
    raw = Path(path).read_bytes()
    head = len(_MAGIC) + 32
    if len(raw) < head or raw[:len(_MAGIC)] != _MAGIC:
        raise ValueError(f"{path} is not a checkpoint (bad header).")
    data = raw[head:]
    if hashlib.sha256(data).digest() != raw[len(_MAGIC):head]:
        raise ValueError(f"{path} is corrupt or truncated (checksum mismatch).")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def find_checkpoint(resume: bool | str, out_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint for ``resume`` (True: this run directory; a path: that run
    directory or file); falls back from ``last.ckpt`` to ``prev.ckpt`` when the last is unreadable."""
    if resume is True:
        where = out_dir / "checkpoints"
    else:
        where = Path(str(resume))
        if where.is_dir() and (where / "checkpoints").is_dir():
            where = where / "checkpoints"
    candidates = [where] if where.is_file() else [where / "last.ckpt", where / "prev.ckpt"]
    for cand in candidates:
        if not cand.exists():
            continue
        try:
            return cand, load_checkpoint(cand)
        except Exception as err:  # a half-written or damaged file: say so and try the previous one
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", cand, err)
    if resume is not True:
        raise ValueError(f"trainer.resume={resume!r}: no readable checkpoint found at {where}.")
    return None


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and initialised CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from ``rng_state()``'s dict (CUDA's only where a GPU is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
