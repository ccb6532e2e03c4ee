"""What a run leaves in its directory besides checkpoints: ``history.jsonl`` (one JSON line per logged
step and per epoch) and ``metrics.json`` (the final metrics: quality, throughput, measured active
parameters, forward FLOPs per example, routing statistics, where and how it ran).

Files that are rewritten (``metrics.json``, ``history.jsonl`` cut back on resume) are replaced
atomically, so a crash leaves the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from core import distributed as dist_utils
from core.experts import Experts
from core.engine.callbacks import TrainState
from core.engine.loaders import batch_size_of, iter_batches, move_to
from core.moe import MoE
from core.runs import machine_description

EvalFn = Callable[[nn.Module, Iterable], dict]


# ------------------------------------------------------------------------------------- atomic files


class WriteError(OSError):
    """A run's file could not be written (a full disk, a quota, a read-only or vanished directory).
    The message names the file, the system's reason and what is still intact; no temporary file is
    left behind."""


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True,
                 keep_previous: str | os.PathLike | None = None) -> None:
    """Replace ``path`` atomically: ``write(f)`` into ``<name>.tmp`` in the same directory (so the rename
    stays on one file system), flushed and fsynced, then ``os.replace`` (the old ``path`` moved to
    ``keep_previous`` first, when given). On failure the temporary file is removed, ``path`` is as it
    was, and a ``WriteError`` says so."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise WriteError(err.errno, f"writing {path} failed: {err.strerror or err}; {kept}; free space or "
                         "fix the directory's permissions, then resume the run") from err


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (``write_atomic``)."""
    write_atomic(path, lambda f: f.write(text), binary=False)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON (key order kept) to ``path`` atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def json_value(v):
    """A logged or evaluated value as JSON holds it: tensors and NumPy scalars become Python numbers
    (or lists); anything else is kept."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


# ---------------------------------------------------------------------------------------- history


def append_history(path: Path, record: dict) -> None:
    """One JSON line at the end of ``history.jsonl`` (appended: lines written before a crash stay)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_history(path: Path, step: int) -> None:
    """Drop the lines after ``step`` (written by an interrupted process after its last checkpoint), and
    a last line cut by the kill; the file is replaced atomically, so a second crash cannot lose the
    lines kept."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    write_text_atomic(path, "".join(x + "\n" for x in keep))


# --------------------------------------------------------------------------------- final metrics


def count_parameters(model: nn.Module, stats: dict | None = None) -> tuple[int, float]:
    """(total, active) parameters. Active = non-expert parameters + each MoE layer's expert
    parameters × (experts per token / E), experts per token measured in ``stats``
    (``core.routing_stats``) when the layer appears there, else the router's ``top_k`` (else E)."""
    total = dist_utils.num_parameters(model)  # sharded tables (torchrec) summed over the ranks
    inactive = 0.0
    layers = (stats or {}).get("layers", {})
    for name, m in model.named_modules():
        if not isinstance(m, MoE):
            continue
        n = sum(p.numel() for p in m.experts.parameters())
        E = m.num_experts
        ept = layers[name]["experts_per_token"] if name in layers else getattr(m.router, "top_k", E)
        inactive += n * (1 - min(float(ept), E) / E)
    return total, total - inactive


@contextlib.contextmanager
def _reference_experts(model: nn.Module):
    """Run experts on their per-expert matmul path (which torch's FLOP counter sees) for a while."""
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    saved = [e.impl for e in experts]
    for e in experts:
        e.impl = "loop"
    try:
        yield
    finally:
        for e, impl in zip(experts, saved):
            e.impl = impl


def flops_per_example(model: nn.Module, evaluate: EvalFn, batch,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Forward FLOPs per example: ``evaluate`` on one batch under torch's FLOP counter, experts on
    their per-expert matmul path so that they are counted.

    Args:
        model: the model (put in eval mode for the count, its mode restored after).
        evaluate: the domain's ``(model, batches) -> dict``.
        batch: one evaluation batch, on the model's device.
        autocast: the precision context of the run (``Trainer.autocast``).
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    # the count must not add to the routing statistics of the final evaluation
    tracking = {m: m.track_stats for m in model.modules() if isinstance(m, MoE)}
    for m in tracking:
        m.track_stats = False
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), autocast(), _reference_experts(model), counter:
            evaluate(model, [batch])
    finally:
        for m, t in tracking.items():
            m.track_stats = t
        model.train(was_training)
    return counter.get_total_flops() / max(1, batch_size_of(batch))


def _first_eval_flops(trainer, model: nn.Module, evaluate: EvalFn, eval_loaders: dict) -> float | None:
    """``flops_per_example`` on the first batch of the first evaluation loader (None: no batch)."""
    if not eval_loaders:
        return None
    batch = next(iter_batches(next(iter(eval_loaders.values())), 0, 0, trainer.seed), None)
    if batch is None:
        return None
    return flops_per_example(model, evaluate, move_to(batch, trainer.device), trainer.autocast)


def final_metrics(trainer, model: nn.Module, state: TrainState, evaluate: EvalFn, eval_loaders: dict,
                  total_steps: int) -> dict:
    """The content of ``metrics.json`` (before callbacks add to it).

    Args:
        trainer: the ``Trainer`` (its ``info``, seed, device and precision are recorded).
        model: the trained model, whole (experts unsharded).
        state: the loop's final state; ``state.last_eval`` is the final evaluation, whose first loader
            gives the routing statistics and the measured experts per token.
        evaluate: the domain's evaluation (run once more under the FLOP counter).
        eval_loaders: ``{name: loader}`` as given to ``fit``.
        total_steps: the planned number of steps.
    """
    ev = state.last_eval
    first = next(iter(eval_loaders), None)
    routing = ev.get(f"{first}_routing", {}) if first else {}
    layers = ev.get(f"{first}_routing_layers", {}) if first else {}
    total, active = count_parameters(model, {"layers": layers})
    return {
        **trainer.info,
        **{k: v for k, v in ev.items() if not k.endswith("_routing_layers") and not k.endswith("_routing")},
        "examples_per_s": state.train_examples / state.train_time_s if state.train_time_s else 0.0,
        "params_total": total,
        "params_active": active,
        "load_cv2": routing.get("load_cv2"),
        "importance_cv2": routing.get("importance_cv2"),
        "dropped_fraction": routing.get("dropped_fraction"),
        "experts_per_token": routing.get("experts_per_token"),
        "routing_entropy": routing.get("entropy"),
        "routing_layers": layers,
        "flops_per_example": _first_eval_flops(trainer, model, evaluate, eval_loaders),
        "epochs": state.epoch + (1 if state.batch else 0),
        "steps": state.step,
        "total_steps": total_steps,
        "skipped_steps": state.skipped,
        "wall_time_s": state.wall_time_s,
        "train_time_s": state.train_time_s,
        "seed": trainer.seed,
        "device": str(trainer.device),
        "precision": "bf16" if trainer.bf16 else "fp32",
        "machine": machine_description(str(trainer.device)),
        "finished_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
