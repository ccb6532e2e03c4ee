"""The optimizer (AdamW, no decay on biases, norms and scalars) and the learning-rate schedule
(linear warmup, then cosine decay): the defaults, which every result in the docs used. timm's
factories give the others (``trainer.optimizer``, ``trainer.scheduler``): ``create_optimizer_v2`` with
the same parameter groups rule (no decay on 1-D parameters and ``no_weight_decay()`` names), and
``create_scheduler_v2`` stepped per optimizer update through ``TimmSchedule``, which gives it the
interface of a torch scheduler (``step``, ``get_last_lr``, ``state_dict``) for the loop and checkpoints."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable

import torch
from torch import nn

from core.engine.config import TrainerConfig


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW with decay on weight matrices only: biases, norm scales, scalars (Soft MoE's scale) and
    the model's ``no_weight_decay()`` names (timm: position embedding, class token) are not decayed.
    Another ``cfg.optimizer`` comes from timm's ``create_optimizer_v2`` with the same groups."""
    if cfg.optimizer != "adamw":
        return _timm_optimizer(model, cfg)
    decay, no_decay = _decay_groups(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters to decay (weight matrices) and not (biases, norms, scalars, skip names)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # stacked expert biases (b1_EF, b2_EO) are biases too, though 2-D
        is_bias = name.endswith("bias") or re.match(r"b\d+_E", name.rsplit(".", 1)[-1]) is not None
        (no_decay if p.ndim <= 1 or is_bias or name in skip else decay).append(p)
    return decay, no_decay


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR | TimmSchedule:
    """``warmup_cosine`` over ``total_steps`` optimizer steps, down to ``cfg.min_lr``.

    Args:
        optimizer: the optimizer whose learning rate (``cfg.lr`` at the peak) it drives.
        cfg: the warmup is ``warmup_steps``, else ``warmup_fraction`` of ``total_steps``, at most
            ``total_steps - 1``.
        total_steps: the steps of the whole run (``max_epochs`` × steps per epoch, or ``max_steps``).
    """
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)
    warmup = min(warmup, max(0, total_steps - 1))
    if cfg.scheduler != "warmup_cosine":
        return TimmSchedule(optimizer, cfg, total_steps, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps, cfg.min_lr / cfg.lr))


def _timm_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    import timm.optim

    decay, no_decay = _decay_groups(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = timm.optim.get_optimizer_class(cfg.optimizer.lower(), bind_defaults=False)
    accepted = inspect.signature(cls).parameters
    extra: dict[str, Any] = {k: v for k, v in (("betas", tuple(cfg.betas)), ("eps", cfg.eps)) if k in accepted}
    return timm.optim.create_optimizer_v2(groups, opt=cfg.optimizer.lower(), lr=cfg.lr,
                                          weight_decay=cfg.weight_decay, **extra)


class TimmSchedule:
    """A timm scheduler stepped once per optimizer update, with a torch scheduler's interface: linear
    warmup from ``lr / warmup`` to ``lr`` over ``warmup`` updates, then the schedule over the rest of the
    run (step: decay every third of it; multistep: at its half and three quarters)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainerConfig, total_steps: int, warmup: int):
        import timm.scheduler

        self.optimizer, self.updates = optimizer, 0
        self.schedule, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=cfg.scheduler, num_epochs=max(1, total_steps - warmup), warmup_epochs=warmup,
            warmup_prefix=True, min_lr=cfg.min_lr, warmup_lr=cfg.lr / max(1, warmup),
            decay_epochs=max(1, (total_steps - warmup) // 3),
            decay_milestones=[(total_steps - warmup) // 2, 3 * (total_steps - warmup) // 4],
            step_on_epochs=False, updates_per_epoch=1)
        self.schedule.step_update(0)

    def step(self) -> None:
        self.updates += 1
        self.schedule.step_update(self.updates)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"updates": self.updates, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.schedule.load_state_dict(state["schedule"])
        self.schedule.step_update(self.updates)
