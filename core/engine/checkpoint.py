"""Checkpoint files and directories, and the generator states they hold.

One process writes a checkpoint file; several ranks write a directory with
``torch.distributed.checkpoint`` (below). A checkpoint file is a plain ``torch.save`` file (``torch.load(path)`` reads it, ``weights_only=True``
included) with a sidecar ``<name>.sha256`` holding the SHA-256 of its bytes (``sha256sum -c`` format).
Both are written to temporary files and fsynced, then moved into place so that at every moment one
verified pair survives: the previous ``last.ckpt`` (and its checksum) becomes ``prev.ckpt``, then the
new checksum and last the new ``last.ckpt`` appear. A crash mid-write leaves a readable checkpoint;
a damaged file, or one without its checksum, is detected and skipped. Files of the earlier format
(``MOECKPT1`` + the checksum + the payload in one file) still load. What the payload holds (model,
optimizer, scheduler, RNG states, ``TrainState``) is the loop's business (``Trainer._save``).

A distributed checkpoint (``last.dcp/``, written by every rank of a ``torchrun`` run) holds the model
and optimizer as ``torch.distributed.checkpoint`` writes them: each rank its own shards (FSDP's and
the experts' DTensor shards; replicated tensors once), with the global shapes in ``.metadata``, so
that loading reshards to any number of ranks and any layout, one process included. Beside them,
``trainer_state.pt`` (rank 0: schedule, position, every rank's generators, configs) and last
``MANIFEST.sha256`` (``sha256sum -c`` format, every file of the directory). Every rank writes into
``last.dcp.tmp/``; when all are done rank 0 writes the manifest and renames: the previous directory
becomes ``prev.dcp/``, the new one ``last.dcp/``. A crash mid-save leaves the previous checkpoints;
a directory whose files do not match its manifest (or without one) is skipped as unreadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
from pathlib import Path

import shutil

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


# ------------------------------------------------------------------------- distributed checkpoints

MANIFEST = "MANIFEST.sha256"
STATE_FILE = "trainer_state.pt"


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_distributed_checkpoint``."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).exists() or (path / ".metadata").exists())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_distributed_checkpoint(path: str | os.PathLike, tensors: dict, extra: dict | None, is_main: bool) -> None:
    """Every rank: write ``tensors`` (``{"model": ..., "optimizer": ...}`` state dicts of DTensor
    shards and plain tensors) with ``torch.distributed.checkpoint`` into the directory ``path``;
    rank 0 (``is_main``) adds ``extra`` as ``trainer_state.pt`` and the manifest, then moves the
    directory into place (the previous one becomes ``prev.dcp``). A collective; on a failed write
    every rank raises ``WriteError`` and the earlier checkpoints are as they were."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from core.distributed import all_gather_object
    from core.engine.records import WriteError

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    prev = path.with_name("prev" + path.suffix)
    error = None
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    try:
        dcp.save(tensors, checkpoint_id=str(tmp))
    except Exception as err:  # every rank learns below whether any rank failed
        error = f"{type(err).__name__}: {err}"
    if is_main and error is None:
        try:
            buf = io.BytesIO()
            torch.save(extra or {}, buf)
            _write_synced(tmp / STATE_FILE, buf.getvalue())
            lines = b"".join(_checksum_line(_sha256_file(f), f.relative_to(tmp).as_posix())
                             for f in sorted(tmp.rglob("*")) if f.is_file())
            _write_synced(tmp / MANIFEST, lines)
            _fsync_dir(tmp)
            if path.exists():
                shutil.rmtree(prev, ignore_errors=True)
                os.replace(path, prev)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            error = f"{err.strerror or err}"
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise WriteError(0, f"writing {path} failed: {errors[0]}; {kept}; free space or fix the directory's "
                         "permissions, then resume the run")


def verify_distributed_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file of the directory against its manifest and return ``trainer_state.pt``'s
    content; ``ValueError`` naming the first missing, extra or damaged file."""
    path = Path(path)
    manifest = path / MANIFEST
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a verified checkpoint: {MANIFEST} is missing (a crash before the save "
                         "finished, or the directory was copied without it).") from None
    listed = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        listed[name.strip()] = digest.strip().lower()
    for name, digest in listed.items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{path} is incomplete: {name} is missing.")
        if _sha256_file(f) != digest:
            raise ValueError(f"{path} is corrupt: {name} does not match its checksum in {MANIFEST}.")
    if STATE_FILE not in listed:
        raise ValueError(f"{path} is not a training checkpoint: it has no {STATE_FILE}.")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return {**state, "format": "dcp"}


def load_distributed_tensors(path: str | os.PathLike, tensors: dict) -> None:
    """Fill ``tensors`` (state dicts shaped for this run's layout) in place from the directory,
    resharding as needed (any number of ranks wrote it; one process may read it)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, checkpoint_id=str(path))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A verified checkpoint file's payload, or a distributed checkpoint's ``trainer_state.pt`` (with
    ``format: dcp``); ``ValueError`` when it is damaged, incomplete or no checkpoint."""
    path = Path(path)
    return verify_distributed_checkpoint(path) if path.is_dir() else load_checkpoint(path)


def checkpoint_candidates(resume: bool | str, out_dir: Path) -> list[Path]:
    """Where ``resume`` (True: this run directory; a path: that run directory, checkpoint file or
    checkpoint directory) may find a checkpoint, the one to try first first: the newer of
    ``last.ckpt`` (one process) and ``last.dcp/`` (several ranks), then the previous ones."""
    if resume is True:
        where = out_dir / "checkpoints"
    else:
        where = Path(str(resume)).expanduser()
        if where.is_dir() and (where / "checkpoints").is_dir():
            where = where / "checkpoints"
    if where.is_file() or is_distributed_checkpoint(where):
        return [where]

    def newest_first(names):
        present = [where / n for n in names if (where / n).exists()]
        return sorted(present, key=lambda p: p.stat().st_mtime, reverse=True) or [where / names[0]]

    return newest_first(["last.ckpt", "last.dcp"]) + newest_first(["prev.ckpt", "prev.dcp"])


def find_checkpoint(resume: bool | str, out_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint for ``resume`` (see ``checkpoint_candidates``), falling back to
    the previous one when it is unreadable. A distributed checkpoint comes back as the content of
    its ``trainer_state.pt`` with ``format: dcp``."""
    candidates = checkpoint_candidates(resume, out_dir)
    where = candidates[0].parent
    for cand in candidates:
        if not cand.exists():
            continue
        try:
            return cand, read_checkpoint(cand)
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
