"""The shared training engine: one loop that every domain (vision, recsys, multimodal, nlp) reuses.

What it does: AdamW (no weight decay on biases, norms, scalars and the model's
``no_weight_decay()`` names), linear warmup then cosine decay, gradient clipping, the routers'
auxiliary losses (``core.collect_aux_loss``) added to the task loss, ``core.after_optimizer_step``
after every optimizer step, evaluation at the end of every epoch, a tqdm progress bar, CPU or CUDA
(bf16 autocast on CUDA only; fp32 on CPU, where bf16 is slow without native support), seeding,
atomic checksummed checkpoints (last + previous) with exact mid-epoch resume, a guard against
non-finite losses, and ``metrics.json`` / ``history.jsonl`` in the run directory.

The domain supplies the model, the loaders, ``loss_fn(model, batch) -> (loss, logs)`` and
``evaluate(model, batches) -> dict``; the engine knows nothing else about it.

Example::

    from core.engine import TensorLoader, Trainer, TrainerConfig, seed_everything

    seed_everything(0)
    model = build_model()
    train = TensorLoader((x_train, y_train), batch_size=128, shuffle=True, drop_last=True)
    test = TensorLoader((x_test, y_test), batch_size=512)

    def loss_fn(model, batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss, {}

    def evaluate(model, batches):
        correct = n = 0
        for x, y in batches:
            correct += (model(x).argmax(-1) == y).sum().item(); n += len(y)
        return {"acc": correct / n}

    trainer = Trainer(TrainerConfig(max_epochs=3, lr=1e-3), out_dir="runs/x", seed=0,
                      info={"domain": "vision", "router": "topk"})
    metrics = trainer.fit(model, train, loss_fn, evaluate, eval_loaders={"test": test})
    metrics["test_acc"], metrics["examples_per_s"], metrics["params_active"]

Resuming: ``TrainerConfig(resume=True)`` continues from ``<out_dir>/checkpoints/last.ckpt`` (or
``prev.ckpt`` when the last one is unreadable) in the same batch order, so a killed-and-resumed
CPU run ends with the uninterrupted run's metrics.

Active parameters are *measured*: non-expert parameters plus, per MoE layer, its expert parameters
× (experts per token / E) counted by ``core.routing_stats`` during the final evaluation (so expert
choice, capacity drops and Soft MoE slots are accounted for as they happened); before any forward
the router's ``top_k`` (else E) is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import core
from core import distributed as dist_utils
from core.moe import MoE
from core.runs import machine_description
from core.checks import check_int

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]
EvalFn = Callable[[nn.Module, Iterable], dict]

_MAGIC = b"MOECKPT1"


class NonFiniteLossError(FloatingPointError):
    """The loss (or one of its terms, or the gradient norm) became NaN or infinite."""


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class TrainerConfig:
    """Everything the loop needs; the keys of ``conf/trainer/default.yaml``.

    Args:
        max_epochs: passes over the training data.
        max_steps: stop after this many optimizer steps in total (None: no limit).
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine decay.
        weight_decay: AdamW decoupled weight decay (matrices only).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup steps (None: ``warmup_fraction`` of the total).
        warmup_fraction: warmup as a fraction of the total steps when ``warmup_steps`` is None.
        grad_clip: clip the global gradient norm to this (None or 0: no clipping).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda`` / ``cuda:N``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        resume: continue from the run directory's checkpoints; or a path to a run directory or file.
        skip_nonfinite: skip an optimizer step whose loss or gradient is not finite instead of stopping.
        checkpoint: write checkpoints at the end of every epoch (and every ``checkpoint_every_steps``).
        checkpoint_every_steps: also checkpoint inside an epoch every this many steps (None: never).
        log_every_steps: one ``history.jsonl`` line per this many steps (epoch lines always).
        eval_every_epochs: evaluate every this many epochs (the final state is always evaluated).
        progress: tqdm bar: ``auto`` (only on a terminal), true or false.
        save_model: write the final weights as a plain state dict, ``<out_dir>/model.pt`` (e.g. the
            dense model that ``upcycle_from=`` starts an MoE from).
        expert_parallel: under torchrun, spread every MoE layer's routed experts over the ranks
            (``core.distributed.shard_experts``); False: every rank holds every expert (plain data
            parallelism). No effect in one process.
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
    checkpoint: bool = True
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 50
    eval_every_epochs: int = 1
    progress: bool | str = "auto"
    save_model: bool = True
    expert_parallel: bool = False

    def __post_init__(self):
        check_int("trainer.max_epochs", self.max_epochs, 1)
        if self.max_steps is not None:
            check_int("trainer.max_steps", self.max_steps, 1)
        for key in ("lr", "min_lr", "weight_decay", "eps", "warmup_fraction"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"trainer.{key}={v!r} is not allowed: it must be a finite number >= 0.")
        if not self.lr > 0:
            raise ValueError(f"trainer.lr={self.lr!r} is not allowed: it must be > 0.")
        if self.warmup_fraction >= 1:
            raise ValueError(f"trainer.warmup_fraction={self.warmup_fraction!r} is not allowed: it must be in [0, 1).")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"trainer.betas={list(self.betas)!r} is not allowed: two numbers in [0, 1).")
        if self.warmup_steps is not None:
            check_int("trainer.warmup_steps", self.warmup_steps, 0)
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            raise ValueError(f"trainer.grad_clip={self.grad_clip!r} is not allowed: a number >= 0 or null.")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"trainer.device={self.device!r} is not allowed: use auto, cpu, cuda or cuda:N.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"trainer.precision={self.precision!r} is not allowed: use auto, fp32 or bf16.")
        if self.checkpoint_every_steps is not None:
            check_int("trainer.checkpoint_every_steps", self.checkpoint_every_steps, 1)
        check_int("trainer.log_every_steps", self.log_every_steps, 1)
        check_int("trainer.eval_every_epochs", self.eval_every_epochs, 1)
        if self.progress not in ("auto", True, False):
            raise ValueError(f"trainer.progress={self.progress!r} is not allowed: use auto, true or false.")
        if not isinstance(self.expert_parallel, bool):
            raise ValueError(f"trainer.expert_parallel={self.expert_parallel!r} is not allowed: use true or false.")
        self.betas = tuple(float(b) for b in self.betas)

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> "TrainerConfig":
        """Build from a dict-like config, rejecting unknown keys with the list of allowed ones."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"trainer.{unknown[0]} is not a trainer key: allowed keys are {sorted(allowed)}.")
        return cls(**dict(cfg))


# ------------------------------------------------------------------------------------- seeding, data


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, batch...), stable across processes."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TensorLoader:
    """Batches of in-memory tensors, with the order and any augmentation fixed by (seed, epoch).

    Cheap for data that fits in memory (images as uint8, tabular features): one index permutation per
    epoch and one tensor gather per batch, no worker processes. ``transform(batch, generator)``
    receives a generator seeded by (seed, epoch, batch index), so a resumed epoch can start at any
    batch and still see exactly the same augmented data.

    Args:
        tensors: tensors with the same first dimension (e.g. images and labels).
        batch_size: examples per batch.
        shuffle: a fresh permutation every epoch.
        drop_last: drop the last incomplete batch.
        transform: optional ``(batch_tuple, generator) -> batch`` applied per batch.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, transform: Callable | None = None):
        tensors = tuple(tensors)
        if not tensors:
            raise ValueError("tensors=() is not allowed: give at least one tensor.")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"tensors have different lengths {[t.shape[0] for t in tensors]}: they must match.")
        check_int("batch_size", batch_size, 1)
        self.tensors, self.batch_size, self.shuffle, self.drop_last = tensors, batch_size, shuffle, drop_last
        self.transform = transform
        self.num_examples = n

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1) -> Iterator:
        """Batches ``start, start+1, ...`` of epoch ``epoch`` (order from a generator seeded by (seed, epoch)).

        With ``world_size`` > 1 each batch is cut into ``world_size`` near-equal slices and rank
        ``rank`` gets its slice (a batch smaller than ``world_size`` is first filled by repeating its
        examples), so the global batch, the steps per epoch and the resume position do not depend on
        the number of ranks; the transform's generator then also folds in the rank.
        """
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(seed, epoch))
            order = torch.randperm(self.num_examples, generator=g)
        else:
            order = torch.arange(self.num_examples)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if world_size > 1:
                idx = shard_slice(idx, rank, world_size)
            batch = tuple(t[idx] for t in self.tensors)
            if self.transform is not None:
                parts = (seed, epoch, i) if world_size == 1 else (seed, epoch, i, rank)
                batch = self.transform(batch, torch.Generator().manual_seed(derive_seed(*parts)))
            yield batch

    def __iter__(self) -> Iterator:
        return self.batches()


def iter_batches(loader, epoch: int = 0, start: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1) -> Iterator:
    """Batches of one epoch from ``start`` on, from a ``TensorLoader``-like object (``batches()``) or
    any iterable; a ``torch.utils.data.DataLoader`` built with ``generator=`` is reseeded by
    (seed, epoch) so its order is reproducible too. With ``world_size`` > 1, rank ``rank`` gets its
    slice of every batch (``TensorLoader.batches``; other iterables: ``shard_batch``)."""
    if hasattr(loader, "batches"):
        if world_size > 1:
            return iter(loader.batches(epoch=epoch, start=start, seed=seed, rank=rank, world_size=world_size))
        return iter(loader.batches(epoch=epoch, start=start, seed=seed))
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(derive_seed(seed, epoch))
    batches = itertools.islice(iter(loader), start, None)
    if world_size > 1:
        return (shard_batch(b, rank, world_size) for b in batches)
    return batches


def shard_slice(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of a batch's example indices: near-equal contiguous slices, a batch
    smaller than ``world_size`` filled up by repeating its examples (no rank gets an empty batch)."""
    if idx.numel() < world_size:
        idx = idx.repeat(math.ceil(world_size / max(1, idx.numel())))[:world_size]
    return idx.tensor_split(world_size)[rank]


def shard_batch(batch, rank: int, world_size: int):
    """Rank ``rank``'s slice (``shard_slice``) of every tensor in nested tuples/lists/dicts."""
    if isinstance(batch, torch.Tensor):
        return batch[shard_slice(torch.arange(batch.shape[0]), rank, world_size)]
    if isinstance(batch, Mapping):
        return type(batch)({k: shard_batch(v, rank, world_size) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard_batch(v, rank, world_size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world_size) for v in batch)
    raise ValueError(f"cannot split a {type(batch).__name__} batch across ranks: use a core.engine.TensorLoader "
                     "(its batches are split by example index) or batches of tensors.")


def move_to(batch, device: torch.device):
    """Move tensors inside nested tuples/lists/dicts (and objects with ``.to``) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def batch_size_of(batch) -> int:
    """Examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0])
    if hasattr(batch, "stride"):  # torchrec KeyedJaggedTensor
        return int(batch.stride())
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}: pass count_examples= to fit().")


# ------------------------------------------------------------------------------- optimizer, schedule


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only: biases, norm scales, scalars (Soft MoE's scale) and
    the model's ``no_weight_decay()`` names (timm: position embedding, class token) are not decayed."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # stacked expert biases (b1_EF, b2_EO) are biases too, though 2-D
        is_bias = name.endswith("bias") or re.match(r"b\d+_E", name.rsplit(".", 1)[-1]) is not None
        (no_decay if p.ndim <= 1 or is_bias or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# --------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a checksummed temporary file, fsync, then ``os.replace``; the previous
    ``last`` becomes ``prev`` so that one good checkpoint always survives a crash mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_MAGIC + hashlib.sha256(data).digest() + data)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name("prev" + path.suffix))
    os.replace(tmp, path)


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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------- parameter counts


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
    experts = [m for m in model.modules() if isinstance(m, core.Experts)]
    saved = [e.impl for e in experts]
    for e in experts:
        e.impl = "loop"
    try:
        yield
    finally:
        for e, impl in zip(experts, saved):
            e.impl = impl


# -------------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class _State:
    epoch: int = 0            # current epoch
    batch: int = 0            # batches of `epoch` already consumed
    step: int = 0             # optimizer steps taken (skipped steps included)
    skipped: int = 0
    epoch_loss_sum: float = 0.0
    epoch_examples: int = 0
    train_examples: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    last_eval: dict = dataclasses.field(default_factory=dict)
    last_eval_step: int = -1


class Trainer:
    """The training loop (see the module docstring).

    Args:
        config: a ``TrainerConfig``.
        out_dir: run directory for ``metrics.json``, ``history.jsonl`` and ``checkpoints/``.
        seed: the run's seed (data order, augmentation; global RNGs are seeded by the caller).
        info: constant fields copied into ``metrics.json`` (domain, router, model...).
    """

    def __init__(self, config: TrainerConfig, out_dir: str | os.PathLike, seed: int = 0, info: Mapping | None = None):
        self.cfg = config
        self.out_dir = Path(out_dir)
        self.seed = int(seed)
        self.info = dict(info or {})
        self.device = resolve_device(config.device)
        # under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, NCCL on CUDA)
        dist_utils.init_distributed(self.device.type)
        self.device = dist_utils.local_device(self.device)
        self.rank, self.world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        self.is_main = self.rank == 0
        if not self.is_main:  # one log: the other ranks report warnings only
            logging.getLogger().setLevel(logging.WARNING)
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        if bf16 and self.device.type != "cuda":
            log.warning("trainer.precision=bf16 on %s: using fp32 (bf16 autocast is for CUDA)", self.device)
            bf16 = False
        self.bf16 = bf16
        self.ckpt_path = self.out_dir / "checkpoints" / "last.ckpt"
        self.history_path = self.out_dir / "history.jsonl"

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- public API --------------------------------------------------------------------------------

    def fit(self, model: nn.Module, train_loader, loss_fn: LossFn, evaluate: EvalFn,
            eval_loaders: Mapping[str, Any] | None = None,
            count_examples: Callable[[Any], int] = batch_size_of) -> dict:
        """Train, evaluate every epoch and at the end, and return (and write) the final metrics.

        Args:
            model: the model (moved to the trainer's device).
            train_loader: a ``TensorLoader``-like object or any re-iterable of batches with ``len``.
            loss_fn: ``(model, batch) -> (task_loss, logs)``; aux losses are added by the engine.
            evaluate: ``(model, batches) -> {metric: value}``, run under no_grad in eval mode.
            eval_loaders: ``{name: loader}``; metrics appear as ``<name>_<metric>``.
            count_examples: examples in a batch (throughput).
        """
        cfg = self.cfg
        eval_loaders = dict(eval_loaders or {})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        model.to(self.device)
        self._distribute(model)
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise ValueError("the training loader yields no batch: more data or a smaller batch_size is needed.")
        total_steps = cfg.max_epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)
        warmup = min(warmup, max(0, total_steps - 1))
        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup, total_steps, cfg.min_lr / cfg.lr))
        state = _State()
        if cfg.resume:
            state = self._resume(model, optimizer, scheduler, state)
        elif self.is_main:
            self.history_path.unlink(missing_ok=True)

        t_start = time.perf_counter()
        wall_before = state.wall_time_s
        bar = self._progress(total_steps, state.step)
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            while state.step < total_steps and state.epoch < cfg.max_epochs:
                model.train()
                t_step = time.perf_counter()
                for batch in iter_batches(train_loader, state.epoch, state.batch, self.seed, self.rank, self.world_size):
                    batch = move_to(batch, self.device)
                    n = count_examples(batch)
                    with self.autocast():
                        task_loss, logs = loss_fn(model, batch)
                    aux_terms = core.aux_loss_terms(model)
                    loss = task_loss.float() + core.collect_aux_loss(model)
                    bad = None if torch.isfinite(loss) else self._offending_term(task_loss, aux_terms)
                    share, n, bad, loss_value = self._across_ranks(loss, n, bad)
                    grad_norm = None
                    if bad is None:
                        (loss if share == 1.0 else loss * share).backward()
                        self._sync_gradients(params)
                        grad_norm = self._clip(params)
                        if grad_norm is not None and not math.isfinite(grad_norm):
                            bad = f"gradient norm={grad_norm}"
                    if bad is not None:
                        if not cfg.skip_nonfinite:
                            raise NonFiniteLossError(
                                f"non-finite loss at step {state.step} (epoch {state.epoch}, batch {state.batch}): "
                                f"{bad}. Set trainer.skip_nonfinite=true to skip such steps.")
                        log.warning("step %d skipped: non-finite %s", state.step, bad)
                        state.skipped += 1
                    else:
                        optimizer.step()
                        dist_utils.sum_router_loads(model)
                        core.after_optimizer_step(model)
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    dist_utils.follow_schedule(model, scheduler.get_last_lr()[0])
                    state.step += 1
                    state.batch += 1
                    if bad is None:
                        state.epoch_loss_sum += loss_value * n
                        state.epoch_examples += n
                    now = time.perf_counter()
                    state.train_time_s += now - t_step
                    state.train_examples += n
                    t_step = now
                    if bar is not None:
                        bar.update(1)
                        if bad is None:
                            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                    if state.step % cfg.log_every_steps == 0 and bad is None:
                        self._append_history({
                            "step": state.step, "epoch": state.epoch, "loss": loss_value,
                            "task_loss": float(task_loss.detach()), "lr": scheduler.get_last_lr()[0],
                            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                            **{f"aux_{k}": float(v.detach()) for k, v in aux_terms.items()},
                            **{k: _plain(v) for k, v in logs.items()},
                        })
                    if state.step >= total_steps:
                        break
                    if cfg.checkpoint and cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                        self._save(model, optimizer, scheduler, state, wall_before + time.perf_counter() - t_start)
                        t_step = time.perf_counter()
                epoch_done = state.batch >= steps_per_epoch
                last = state.step >= total_steps
                if epoch_done or last:
                    self._end_epoch(model, evaluate, eval_loaders, state, last or epoch_done and
                                    (state.epoch + 1) % cfg.eval_every_epochs == 0 or
                                    state.epoch + 1 == cfg.max_epochs)
                    if epoch_done:
                        state.epoch += 1
                        state.batch = 0
                        state.epoch_loss_sum, state.epoch_examples = 0.0, 0
                    if cfg.checkpoint:
                        self._save(model, optimizer, scheduler, state, wall_before + time.perf_counter() - t_start)
        finally:
            if bar is not None:
                bar.close()
        if state.last_eval_step != state.step:  # e.g. resumed from a run that had already finished
            state.last_eval = self._evaluate_all(model, evaluate, eval_loaders)
            state.last_eval_step = state.step
        state.wall_time_s = wall_before + time.perf_counter() - t_start
        # experts back on every rank: the caller gets the whole model, as from one process
        dist_utils.unshard_experts(model)
        metrics = self._final_metrics(model, state, evaluate, eval_loaders, total_steps)
        if self.world_size > 1:
            metrics = dist_utils.broadcast_object({**metrics, "world_size": self.world_size,
                                                   "expert_parallel": cfg.expert_parallel})
        full = dist_utils.full_state_dict(model) if cfg.save_model else {}
        if self.is_main:
            if cfg.save_model:
                tmp = self.out_dir / "model.pt.tmp"
                torch.save({k: v.detach().cpu() for k, v in full.items()}, tmp)
                os.replace(tmp, self.out_dir / "model.pt")
            (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
        if self.world_size > 1:
            dist.barrier()
        return metrics

    # -- pieces ------------------------------------------------------------------------------------

    def _distribute(self, model: nn.Module) -> None:
        """Under torchrun: rank 0's starting weights on every rank, then (``expert_parallel``) each
        MoE layer's experts spread over the ranks, and a random stream per rank (router noise,
        dropout) derived from the seed."""
        if self.world_size <= 1:
            return
        dist_utils.broadcast_parameters(model)
        if self.cfg.expert_parallel:
            layers = dist_utils.shard_experts(model)
            if layers:
                log.info("expert parallelism: %d MoE layers spread over %d ranks", layers, self.world_size)
            else:
                log.info("trainer.expert_parallel=true: the model has no core MoE layer; plain data parallelism")
        torch.manual_seed(derive_seed(self.seed, self.rank, self.world_size))

    def _across_ranks(self, loss: torch.Tensor, n: int, bad: str | None) -> tuple[float, int, str | None, float]:
        """``(share, global examples, agreed non-finite reason, global mean loss)``. Every rank takes or
        skips the step together; each rank's loss is weighted by its share of the global batch, so
        the summed gradients are those of the global mean (one process: ``(1, n, bad, loss)``)."""
        if self.world_size <= 1:
            return 1.0, n, bad, float(loss.detach())
        ok = bad is None
        vec = torch.tensor([n, float(loss.detach()) * n if ok else 0.0, 0.0 if ok else 1.0],
                           dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        total, loss_sum, ranks_bad = vec.tolist()
        if ok and ranks_bad:
            bad = f"loss on {int(ranks_bad)} other rank(s)"
        return n / total, int(total), bad, loss_sum / total

    def _sync_gradients(self, params) -> None:
        """Sum the replicated parameters' gradients over the ranks (sharded experts excluded)."""
        if self.world_size > 1:
            dist_utils.all_reduce_gradients(params)

    def _clip(self, params) -> float | None:
        if self.cfg.grad_clip:
            if self.world_size > 1:  # one norm over every rank's gradients: replicas stay identical
                return dist_utils.clip_grad_norm_(params, self.cfg.grad_clip)
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        return None

    @staticmethod
    def _offending_term(task_loss: torch.Tensor, aux_terms: dict) -> str:
        if not torch.isfinite(task_loss):
            return f"task loss={float(task_loss.detach())}"
        for k, v in aux_terms.items():
            if not torch.isfinite(v):
                return f"auxiliary loss '{k}'={float(v.detach())}"
        return "sum of the loss terms"

    def _progress(self, total: int, initial: int):
        show = self.cfg.progress if self.is_main else False
        if show == "auto":
            show = sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
        if not show:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=self.info.get("router", "train"), dynamic_ncols=True)

    def _evaluate_all(self, model: nn.Module, evaluate: EvalFn, eval_loaders: dict) -> dict:
        """Every eval loader once; routing statistics of the evaluation are kept with the metrics."""
        was_training = model.training
        model.eval()
        out: dict = {}
        try:
            for name, loader in eval_loaders.items():
                core.reset_routing_stats(model)
                n_examples = 0
                t0 = time.perf_counter()

                def batches(loader=loader):
                    nonlocal n_examples
                    for b in iter_batches(loader, 0, 0, self.seed):
                        b = move_to(b, self.device)
                        n_examples += batch_size_of(b)
                        yield b

                with torch.no_grad(), self.autocast():
                    res = evaluate(model, batches())
                dt = time.perf_counter() - t0
                out.update({f"{name}_{k}": _plain(v) for k, v in res.items()})
                out[f"{name}_examples_per_s"] = n_examples / dt if dt > 0 else 0.0
                stats = core.routing_stats(model, reset=True)
                out[f"{name}_routing"] = {k: v for k, v in stats.items() if k != "layers"}
                out[f"{name}_routing_layers"] = stats["layers"]
        finally:
            model.train(was_training)
        return out

    def _end_epoch(self, model, evaluate, eval_loaders, state: _State, do_eval: bool) -> None:
        dist_utils.sum_routing_stats(model)  # every rank's training tokens (evaluation is replicated)
        train_stats = core.routing_stats(model, reset=True)
        record = {
            "epoch": state.epoch, "step": state.step, "end_of_epoch": True,
            "train_loss": state.epoch_loss_sum / max(1, state.epoch_examples),
            "train_examples_per_s": state.train_examples / state.train_time_s if state.train_time_s else 0.0,
            "train_routing": {k: v for k, v in train_stats.items() if k != "layers"},
        }
        if do_eval and eval_loaders:
            state.last_eval = self._evaluate_all(model, evaluate, eval_loaders)
            state.last_eval_step = state.step
            record.update({k: v for k, v in state.last_eval.items() if not k.endswith("_routing_layers")})
            summary = ", ".join(f"{k}={v:.4f}" for k, v in state.last_eval.items() if isinstance(v, float))
            log.info("epoch %d step %d: train_loss=%.4f %s", state.epoch, state.step, record["train_loss"], summary)
        self._append_history(record)

    def _final_metrics(self, model, state: _State, evaluate: EvalFn, eval_loaders: dict, total_steps: int) -> dict:
        ev = state.last_eval
        first = next(iter(eval_loaders), None)
        routing = ev.get(f"{first}_routing", {}) if first else {}
        layers = ev.get(f"{first}_routing_layers", {}) if first else {}
        total, active = count_parameters(model, {"layers": layers})
        metrics = {
            **self.info,
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
            "flops_per_example": self._flops_per_example(model, evaluate, eval_loaders),
            "epochs": state.epoch + (1 if state.batch else 0),
            "steps": state.step,
            "total_steps": total_steps,
            "skipped_steps": state.skipped,
            "wall_time_s": state.wall_time_s,
            "train_time_s": state.train_time_s,
            "seed": self.seed,
            "device": str(self.device),
            "precision": "bf16" if self.bf16 else "fp32",
            "machine": machine_description(str(self.device)),
            "finished_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        return metrics

    def _flops_per_example(self, model: nn.Module, evaluate: EvalFn, eval_loaders: dict) -> float | None:
        """Forward FLOPs per example: the domain's ``evaluate`` on one evaluation batch under torch's
        FLOP counter, experts on their per-expert matmul path so that they are counted."""
        if not eval_loaders:
            return None
        from torch.utils.flop_counter import FlopCounterMode
        batch = next(iter_batches(next(iter(eval_loaders.values())), 0, 0, self.seed), None)
        if batch is None:
            return None
        batch = move_to(batch, self.device)
        was_training = model.training
        model.eval()
        tracking = {m: m.track_stats for m in model.modules() if isinstance(m, MoE)}
        for m in tracking:
            m.track_stats = False
        try:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), self.autocast(), _reference_experts(model), counter:
                evaluate(model, [batch])
        finally:
            for m, t in tracking.items():
                m.track_stats = t
            model.train(was_training)
        return counter.get_total_flops() / max(1, batch_size_of(batch))

    def _append_history(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.history_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, model, optimizer, scheduler, state: _State, wall: float) -> None:
        """Write the checkpoint in the unsharded layout (rank 0 writes; every rank takes part)."""
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if self.world_size > 1:
            bad = [name for names in dist_utils.all_gather_object(bad[:1]) for name in names]
        for name in bad[:1]:
            raise NonFiniteLossError(f"parameter {name} is not finite at step {state.step}: checkpoint not written.")
        state.wall_time_s = wall
        sd = dist_utils.full_state_dict(model)
        payload = {
            "model": sd,
            "buffers": dist_utils.checkpoint_buffers(model, exclude=sd),
            "optimizer": dist_utils.full_optimizer_state_dict(model, optimizer),
            "optimizer_params": dist_utils.optimizer_param_names(model, optimizer),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "state": dataclasses.asdict(state),
            "trainer": dataclasses.asdict(self.cfg),
            "info": self.info,
        }
        if self.world_size > 1:
            payload["rng_ranks"] = dist_utils.all_gather_object(payload["rng"])
        if self.is_main:
            save_checkpoint(self.ckpt_path, payload)

    def _resume(self, model, optimizer, scheduler, state: _State) -> _State:
        found = find_checkpoint(self.cfg.resume, self.out_dir)
        if found is None:
            log.warning("trainer.resume=true but no checkpoint in %s: starting from scratch", self.out_dir / "checkpoints")
            if self.is_main:
                self.history_path.unlink(missing_ok=True)
            return state
        path, ck = found
        # checkpoints hold every expert: each rank takes its slice, whatever the number of ranks that wrote it
        dist_utils.load_full_state_dict(model, ck["model"])
        dist_utils.load_checkpoint_buffers(model, ck.get("buffers", {}))
        dist_utils.load_full_optimizer_state_dict(model, optimizer, ck["optimizer"], ck.get("optimizer_params"))
        scheduler.load_state_dict(ck["scheduler"])
        state = _State(**ck["state"])
        rng_ranks = ck.get("rng_ranks") or [ck["rng"]]
        if len(rng_ranks) == self.world_size:
            _set_rng_state(rng_ranks[self.rank])
        else:  # another number of ranks wrote it: a fresh per-rank stream from the position
            _set_rng_state(ck["rng"])
            torch.manual_seed(derive_seed(self.seed, self.rank, self.world_size, state.step))
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, state.epoch, state.batch, state.step)
        self._truncate_history(state.step)
        return state

    def _truncate_history(self, step: int) -> None:
        """Drop history lines written after the checkpoint (by the interrupted process)."""
        if not self.is_main or not self.history_path.exists():
            return
        keep = []
        for line in self.history_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        self.history_path.write_text("".join(x + "\n" for x in keep))


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device!r} is not allowed here: no CUDA device is available; use auto or cpu.")
    return torch.device(device)


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v
