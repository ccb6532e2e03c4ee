"""Gathering what the routers and MoE layers of a model hold: auxiliary losses, post-step updates and
routing statistics (docs/routers.md §5). The layer and routers store these on themselves (no tuples
returned, no global state); these functions walk a model and collect them.
"""

from __future__ import annotations

import torch
from torch import nn

from core.moe import MoE
from core.routers.base import Router

__all__ = ["after_optimizer_step", "aux_loss_terms", "collect_aux_loss", "reset_routing_stats", "routing_stats"]


@torch.no_grad()
def after_optimizer_step(model: nn.Module) -> None:
    """Call after every optimizer step: routers with state updated outside autograd (DeepSeek-V3's
    auxiliary-loss-free bias) define ``after_optimizer_step()``."""
    for m in model.modules():
        if isinstance(m, Router) and hasattr(m, "after_optimizer_step"):
            m.after_optimizer_step()


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every router's weighted auxiliary losses from the last training forward."""
    terms = [v for m in model.modules() if isinstance(m, Router) for v in m.aux_losses.values()]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return torch.stack([t.float() for t in terms]).sum()


def aux_loss_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Auxiliary losses summed over routers, by name (``importance``, ``load``, ...)."""
    out: dict[str, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, Router):
            for k, v in m.aux_losses.items():
                out[k] = out[k] + v if k in out else v
    return out


def _cv2(v: torch.Tensor) -> float:
    mean = v.mean()
    return float(v.var(correction=0) / mean.square()) if mean > 0 else 0.0


def routing_stats(model: nn.Module, reset: bool = False) -> dict:
    """Routing analytics accumulated by every MoE layer since the last reset (docs/routers.md §5).

    Returns ``{"layers": {name: {...}}, <averages over layers>}`` with, per layer: tokens per expert,
    load CV² (assignment counts), importance CV² (router probability mass), dropped fraction of
    choices, experts per token, and mean routing entropy.
    """
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, MoE) or m.stat_counters[4] == 0:
            continue
        dropped, choices, n_tokens, entropy_sum, _ = m.stat_counters.tolist()
        tokens_E = m.stat_tokens_E
        layers[name] = {
            "tokens_per_expert": tokens_E.tolist(),
            "load_cv2": _cv2(tokens_E),
            "importance_cv2": _cv2(m.stat_importance_E),
            "dropped_fraction": dropped / choices if choices else 0.0,
            "experts_per_token": float(tokens_E.sum()) / n_tokens if n_tokens else 0.0,
            "entropy": entropy_sum / n_tokens if n_tokens else 0.0,
        }
        if reset:
            m.reset_stats()
    summary: dict = {"layers": layers}
    if layers:
        for key in ("load_cv2", "importance_cv2", "dropped_fraction", "experts_per_token", "entropy"):
            summary[key] = sum(v[key] for v in layers.values()) / len(layers)
    return summary


def reset_routing_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.reset_stats()
