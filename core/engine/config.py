"""The trainer's settings (``TrainerConfig``), seeding and the device choice."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import re
from typing import Mapping, Sequence

import numpy as np
import torch

from core.checks import check_int


@dataclasses.dataclass
class TrainerConfig:
    """Everything the loop needs; the keys of ``conf/trainer/default.yaml``.

    Args:
        max_epochs: passes over the training data.
        max_steps: stop after this many optimizer steps in total (None: no limit).
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine decay (at most ``lr``).
        weight_decay: AdamW decoupled weight decay (matrices only).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup steps (None: ``warmup_fraction`` of the total); fewer than the run's
            steps, which ``Trainer.fit`` checks once the training loader's length is known.
        warmup_fraction: warmup as a fraction of the total steps when ``warmup_steps`` is None.
        grad_clip: clip the global gradient norm to this (None or 0: no clipping).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda`` / ``cuda:N``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        resume: continue from the run directory's checkpoints; or a path to a run directory or file.
        skip_nonfinite: skip an optimizer step whose loss or gradient is not finite instead of stopping.
        max_skipped_fraction: with ``skip_nonfinite``, the largest share of the run's steps that may be
            skipped: a run that skips more did not really train, and fails with ``NonFiniteLossError``
            (naming the count and the share; as soon as the share is certain to be exceeded) instead of
            reporting results. 1.0: never.
        checkpoint: write checkpoints at the end of every epoch (and every ``checkpoint_every_steps``).
        checkpoint_every_steps: also checkpoint inside an epoch every this many steps (None: never).
        log_every_steps: one ``history.jsonl`` line per this many steps (epoch lines always).
        eval_every_epochs: evaluate every this many epochs (the final state is always evaluated).
        progress: tqdm bar: ``auto`` (only on a terminal), true or false.
        save_model: write the final weights as a plain state dict, ``<out_dir>/model.pt`` (e.g. the
            dense model that ``upcycle_from=`` starts an MoE from).
        data_parallel: under torchrun, ``ddp`` (``DistributedDataParallel``) or ``fsdp`` (FSDP2's
            ``fully_shard`` per block: parameters, gradients and optimizer state sharded over the
            ranks); see ``core.parallel``. No effect in one process.
        expert_parallel: under torchrun, spread every MoE layer's routed experts over the ranks
            (DTensor shards on a device mesh, all-to-all dispatch: ``core.parallel.shard_experts``);
            False: every rank holds every expert. No effect in one process.
        expert_parallel_size: the ranks one set of experts is spread over (None: all of them).
            Fewer (it must divide the ranks and E) makes W/size groups, each holding every expert
            once; FSDP then shards each expert's weights over the groups (a 2-D device mesh, as
            torchtitan's MoE), so it needs ``data_parallel=fsdp``.
        optimizer: ``adamw`` (the suite's AdamW: no decay on biases, norms and scalars) or any name of
            timm's ``create_optimizer_v2`` (``timm.optim.list_optimizers()``: sgd, lamb, lion, ...), built
            with ``lr``, ``weight_decay`` and, where the optimizer takes them, ``betas`` and ``eps``.
        scheduler: ``warmup_cosine`` (linear warmup, then cosine to ``min_lr``) or a schedule of timm's
            ``create_scheduler_v2`` (cosine, tanh, step, multistep, poly, constant, rsqrt) stepped every
            optimizer step over the run, with the same warmup and ``min_lr``.
        compile: compile the model with ``torch.compile`` (``nn.Module.compile``: in place, so the state
            dict, checkpoints and ``model.pt`` keep the uncompiled model's keys).
    """

    max_epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    grad_clip: float | None = 1.0
    device: str = "auto"
    precision: str = "auto"
    resume: bool | str = False
    skip_nonfinite: bool = False
    max_skipped_fraction: float = 0.1
    checkpoint: bool = True
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 50
    eval_every_epochs: int = 1
    progress: bool | str = "auto"
    save_model: bool = True
    data_parallel: str = "ddp"
    expert_parallel: bool = False
    expert_parallel_size: int | None = None
    compile: bool = False
    optimizer: str = "adamw"
    scheduler: str = "warmup_cosine"

    def __post_init__(self):
        check_int("trainer.max_epochs", self.max_epochs, 1)
        if self.max_steps is not None:
            check_int("trainer.max_steps", self.max_steps, 1)
        for key in ("lr", "min_lr", "weight_decay", "eps", "warmup_fraction"):
            v = getattr(self, key)
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise ValueError(f"trainer.{key}={v!r} is not allowed: it must be a finite number >= 0.")
        if not self.lr > 0:
            raise ValueError(f"trainer.lr={self.lr!r} is not allowed: it must be > 0.")
        if self.min_lr > self.lr:  # the cosine would climb from lr up to min_lr
            raise ValueError(f"trainer.min_lr={self.min_lr!r} is not allowed: it must be <= trainer.lr={self.lr!r} "
                             "(the learning rate decays from lr down to min_lr).")
        if self.warmup_fraction >= 1:
            raise ValueError(f"trainer.warmup_fraction={self.warmup_fraction!r} is not allowed: it must be in [0, 1).")
        betas = self.betas
        if (isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in betas)):
            shown = list(betas) if isinstance(betas, Sequence) and not isinstance(betas, str) else betas
            raise ValueError(f"trainer.betas={shown!r} is not allowed: two numbers in [0, 1).")
        if self.warmup_steps is not None:
            check_int("trainer.warmup_steps", self.warmup_steps, 0)
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and math.isfinite(self.grad_clip)
                                               and self.grad_clip >= 0):
            raise ValueError(f"trainer.grad_clip={self.grad_clip!r} is not allowed: a finite number >= 0, or null "
                             "(null or 0: no clipping).")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"trainer.device={self.device!r} is not allowed: use auto, cpu, cuda or cuda:N.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"trainer.precision={self.precision!r} is not allowed: use auto, fp32 or bf16.")
        if not (isinstance(self.resume, (bool, os.PathLike)) or (isinstance(self.resume, str) and self.resume)):
            raise ValueError(f"trainer.resume={self.resume!r} is not allowed: use true, false or the path of a run "
                             "directory or checkpoint file.")
        if self.data_parallel not in ("ddp", "fsdp"):
            raise ValueError(f"trainer.data_parallel={self.data_parallel!r} is not allowed: use ddp or fsdp.")
        if self.expert_parallel_size is not None and (isinstance(self.expert_parallel_size, bool) or not isinstance(
                self.expert_parallel_size, int) or self.expert_parallel_size < 1):
            raise ValueError(f"trainer.expert_parallel_size={self.expert_parallel_size!r} is not allowed: use null "
                             "(every rank) or a positive integer that divides the number of ranks.")
        for key in ("skip_nonfinite", "checkpoint", "save_model", "expert_parallel", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"trainer.{key}={getattr(self, key)!r} is not allowed: use true or false.")
        check_optimizer_name(self.optimizer)
        check_scheduler_name(self.scheduler)
        v = self.max_skipped_fraction
        if not _is_number(v) or not 0 <= v <= 1:
            raise ValueError(f"trainer.max_skipped_fraction={v!r} is not allowed: a number in [0, 1] (the largest "
                             "share of the run's steps skip_nonfinite may skip; 1: no limit).")
        if self.checkpoint_every_steps is not None:
            check_int("trainer.checkpoint_every_steps", self.checkpoint_every_steps, 1)
        check_int("trainer.log_every_steps", self.log_every_steps, 1)
        check_int("trainer.eval_every_epochs", self.eval_every_epochs, 1)
        if self.progress not in ("auto", True, False):
            raise ValueError(f"trainer.progress={self.progress!r} is not allowed: use auto, true or false.")
        self.betas = tuple(float(b) for b in self.betas)

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> "TrainerConfig":
        """Build from a dict-like config, rejecting unknown keys with the list of allowed ones."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"trainer.{unknown[0]} is not a trainer key: allowed keys are {sorted(allowed)}.")
        return cls(**dict(cfg))


def _is_number(value) -> bool:
    """An int or float (not a bool, not a string), NaN included (callers test finiteness)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, batch...), stable across processes."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device!r} is not allowed here: no CUDA device is available; use auto or cpu.")
    return torch.device(device)


TIMM_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "rsqrt")


def check_optimizer_name(name: str) -> None:
    """``adamw`` or an optimizer timm's ``create_optimizer_v2`` knows; ``ValueError`` listing them."""
    if name == "adamw":
        return
    import timm.optim

    known = timm.optim.list_optimizers()
    if not isinstance(name, str) or name.lower() not in known:
        raise ValueError(f"trainer.optimizer={name!r} is not allowed: use adamw (the default) or one of timm's "
                         f"optimizers: {', '.join(known)}.")


def check_scheduler_name(name: str) -> None:
    if name != "warmup_cosine" and name not in TIMM_SCHEDULES:
        raise ValueError(f"trainer.scheduler={name!r} is not allowed: use warmup_cosine (the default) or one of "
                         f"timm's schedules: {', '.join(TIMM_SCHEDULES)}.")
