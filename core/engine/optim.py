"""The optimizer (AdamW, no decay on biases, norms and scalars) and the learning-rate schedule
(linear warmup, then cosine decay)."""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn

from core.engine.config import TrainerConfig


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``warmup_cosine`` over ``total_steps`` optimizer steps, down to ``cfg.min_lr``.

    Args:
        optimizer: the optimizer whose learning rate (``cfg.lr`` at the peak) it drives.
        cfg: the warmup is ``warmup_steps``, else ``warmup_fraction`` of ``total_steps``, at most
            ``total_steps - 1``.
        total_steps: the steps of the whole run (``max_epochs`` × steps per epoch, or ``max_steps``).
    """
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)
    warmup = min(warmup, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps, cfg.min_lr / cfg.lr))
