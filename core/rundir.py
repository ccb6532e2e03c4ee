"""A run directory belongs to one run: ownership, a lock, and resuming the same run.

- **Ownership**: a run that is not resuming refuses a directory that already holds another run's
  work (checkpoints, ``history.jsonl``, ``metrics.json``), with a message that says how to resume it
  and how to start afresh, instead of deleting that work.
- **One writer**: an advisory lock (``fcntl.flock`` on ``<run dir>/.lock``) is held for the length of
  the run; the kernel releases it on any exit, so a killed run leaves no stale lock, and the file
  names the holder (pid, host, start) for the message a second process gets.
- **Resume means the same run**: the checkpoint records the resolved config it was trained with;
  resuming compares it with the new one and refuses any difference outside ``SAFE_TO_CHANGE``
  (step and epoch limits, evaluation, logging and checkpoint cadence, the device, threads), naming
  the keys. Asking to resume when no checkpoint is readable names each file and why, and touches
  nothing.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Any, Mapping

from core.checks import ConfigError

__all__ = ["RunLock", "SAFE_TO_CHANGE", "changed_keys", "check_fresh_directory", "readable_checkpoint",
           "resume_changes"]

# keys a resumed run may change: they decide how long it runs, how often it reports, where and on
# what it runs (devices, threads, how experts and embedding tables are laid out over the ranks: a
# checkpoint holds the whole model), but not the model, the data, the optimisation or the seed
SAFE_TO_CHANGE = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.resume", "trainer.eval_every_epochs",
    "trainer.log_every_steps", "trainer.checkpoint", "trainer.checkpoint_every_steps", "trainer.progress",
    "trainer.save_model", "trainer.device", "trainer.expert_parallel", "trainer.expert_parallel_size", "trainer.data_parallel",
    "sharding", "threads", "output_dir",
    "data.eval_batch_size", "logger", "plots",
)
# what a run leaves in its directory (Hydra's own .hydra/ and the log are not a run's work)
RUN_FILES = ("checkpoints/last.ckpt", "checkpoints/prev.ckpt", "checkpoints/last.dcp", "checkpoints/prev.dcp",
             "history.jsonl", "metrics.json")


def check_fresh_directory(out_dir: Path, key: str) -> None:
    """Refuse to start a new run in ``out_dir`` when it holds another run's work."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return
    raise ConfigError(key, str(out_dir), f"it holds an earlier run ({', '.join(found)}): continue it with "
                      "trainer.resume=true, or start afresh in another directory (e.g. hydra.run.dir=<new dir>) "
                      "or after moving that run away")


def readable_checkpoint(resume: bool | str, out_dir: Path) -> tuple[Path, dict]:
    """The newest readable checkpoint ``trainer.resume`` asks for (True: this run directory's; a path:
    that run directory's, that file or that distributed-checkpoint directory), or a ``ConfigError``
    naming every file looked at and why it cannot be used."""
    from core.engine.checkpoint import checkpoint_candidates, read_checkpoint

    reasons = []
    for cand in checkpoint_candidates(resume, out_dir):
        if not cand.exists():
            reasons.append(f"{cand}: no such file")
            continue
        try:
            return cand, read_checkpoint(cand)
        except Exception as err:  # truncated, corrupt, or not a checkpoint at all
            reasons.append(f"{cand}: {err}")
    raise ConfigError("trainer.resume", resume, "there is no readable checkpoint to resume (" + "; ".join(reasons)
                      + "); start a new run without trainer.resume, in a new directory")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def changed_keys(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` of the leaves that differ between two nested configs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


def resume_changes(saved: Mapping | None, current: Mapping) -> dict[str, tuple[Any, Any]]:
    """The safe changes a resumed run makes to its checkpoint's config; a ``ConfigError`` naming the
    keys when any other key differs. Checkpoints that recorded no config are not compared."""
    if saved is None:
        return {}
    changes = changed_keys(saved, current)
    unsafe = {k: v for k, v in changes.items() if not k.startswith(SAFE_TO_CHANGE)}
    if unsafe:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(unsafe.items())[:6])
        more = f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else ""
        resume = (current.get("trainer") or {}).get("resume", True)
        raise ConfigError("trainer.resume", resume, f"resuming must continue the same run, and the config differs from "
                          f"the checkpoint's in {shown}{more}; resume with the run's own settings, or start a new "
                          f"run in another directory (only {', '.join(SAFE_TO_CHANGE)} may change)")
    return changes


class RunLock:
    """An exclusive advisory lock on a run directory for the length of a run (``with RunLock(dir):``,
    or ``acquire()``/``release()``). A second process gets a ``ConfigError`` naming the holder."""

    def __init__(self, out_dir: Path, key: str = "output_dir"):
        self.path, self.key, self.fd = Path(out_dir) / ".lock", key, None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(self.key, str(self.path.parent), f"the run directory cannot be created or written "
                              f"({err.strerror or err}); give a writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(self.key, str(self.path.parent), f"another run is writing into this directory "
                              f"({holder}); wait for it to end, or use another directory") from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}: {' '.join(sys.argv)[:300]}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
