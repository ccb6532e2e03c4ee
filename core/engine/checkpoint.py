"""Checkpoint files and the generator states they hold.

A checkpoint is a plain ``torch.save`` file (``torch.load(path)`` reads it, ``weights_only=True``
included) with a sidecar ``<name>.sha256`` holding the SHA-256 of its bytes (``sha256sum -c`` format).
Both are written to temporary files and fsynced, then moved into place so that at every moment one
verified pair survives: the previous ``last.ckpt`` (and its checksum) becomes ``prev.ckpt``, then the
new checksum and last the new ``last.ckpt`` appear. A crash mid-write leaves a readable checkpoint;
a damaged file, or one without its checksum, is detected and skipped. Files of the earlier format
(``MOECKPT1`` + the checksum + the payload in one file) still load. What the payload holds (model,
optimizer, scheduler, RNG states, ``TrainState``) is the loop's business (``Trainer._save``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

# one logger for the whole engine: log lines keep the name (``core.engine``) they had in one module
log = logging.getLogger(__package__)

_OLD_MAGIC = b"MOECKPT1"  # the earlier single-file format: magic, SHA-256 of the payload, payload
CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str | os.PathLike) -> Path:
    """The sidecar holding ``path``'s SHA-256: ``last.ckpt`` -> ``last.ckpt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _checksum_line(digest: str, name: str) -> bytes:
    return f"{digest}  {name}\n".encode()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` with ``torch.save`` and its checksum sidecar, atomically; the previous
    checkpoint (and its sidecar) becomes ``prev``. On failure the temporary files are removed, the
    earlier checkpoints are as they were, and a ``WriteError`` says so."""
    from core.engine.records import WriteError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    prev = path.with_name("prev" + path.suffix)
    tmp, tmp_sum = path.with_name(path.name + ".tmp"), path.with_name(checksum_path(path).name + ".tmp")
    tmp_prev_sum = checksum_path(prev).with_name(checksum_path(prev).name + ".tmp")
    try:
        _write_synced(tmp, data)
        _write_synced(tmp_sum, _checksum_line(hashlib.sha256(data).hexdigest(), path.name))
        if path.exists():
            # prev's checksum first (prev is unverified for a moment, last still verifies), then the file
            old = _recorded_digest(checksum_path(path))
            if old is None:  # an earlier-format file carries its checksum inside
                checksum_path(prev).unlink(missing_ok=True)
            else:
                _write_synced(tmp_prev_sum, _checksum_line(old, prev.name))
                os.replace(tmp_prev_sum, checksum_path(prev))
            os.replace(path, prev)
        # the checksum before the file: a last.ckpt that exists is complete and has its checksum
        os.replace(tmp_sum, checksum_path(path))
        os.replace(tmp, path)
    except OSError as err:
        for t in (tmp, tmp_sum, tmp_prev_sum):
            with contextlib.suppress(OSError):
                t.unlink()
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise WriteError(err.errno, f"writing {path} failed: {err.strerror or err}; {kept}; free space or "
                         "fix the directory's permissions, then resume the run") from err


def _recorded_digest(sidecar: Path) -> str | None:
    """The hex digest recorded in ``sidecar`` (None when there is none)."""
    try:
        text = sidecar.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    words = text.split()
    return words[0].lower() if words else None


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint written by ``save_checkpoint`` (it has a checksum sidecar, or
    is of the earlier single-file format), as opposed to plain weights such as ``model.pt``."""
    path = Path(path)
    if checksum_path(path).is_file():
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(_OLD_MAGIC)) == _OLD_MAGIC
    except OSError:
        return False


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` after checking it against its sidecar; raises
    ``ValueError`` if it is truncated or corrupt, has no checksum, or is not a checkpoint."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:len(_OLD_MAGIC)] == _OLD_MAGIC:  # the earlier format
        head = len(_OLD_MAGIC) + 32
        data = raw[head:]
        if len(raw) < head or hashlib.sha256(data).digest() != raw[len(_OLD_MAGIC):head]:
            raise ValueError(f"{path} is corrupt or truncated (checksum mismatch).")
    else:
        sidecar = checksum_path(path)
        expected = _recorded_digest(sidecar)
        if expected is None:
            raise ValueError(f"{path} is not a verified checkpoint: its checksum file {sidecar.name} is missing or "
                             "empty (a crash before it was written, or the file was copied without it).")
        if hashlib.sha256(raw).hexdigest() != expected:
            raise ValueError(f"{path} is corrupt or truncated (checksum mismatch with {sidecar.name}).")
        data = raw
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:  # the checksum matched, but the bytes are no torch.save file
        raise ValueError(f"{path} is not a checkpoint (torch.load: {err}).") from None


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
    """This process's Python, NumPy, torch (and initialised CUDA) generator states, in types that
    ``torch.load(..., weights_only=True)`` reads (NumPy's key as a list of ints)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, key.tolist(), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from ``rng_state()``'s dict (CUDA's only where a GPU is present)."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
