"""moe-suite core: routers, experts, the MoE layer, auxiliary losses and routing analytics.

The package re-exports the names most code needs; the modules are layered bottom-up (``checks`` →
``routing``/``losses`` → ``routers``/``experts`` → ``moe`` → ``stats``/``surgery``/``analytics``/
``distributed`` → ``engine``/``validate`` → ``run`` → tools), with no import cycle.
"""

from __future__ import annotations

from core.experts import Experts
from core.moe import MoE
from core.routers.base import Router
from core.routing import Routing
from core.stats import after_optimizer_step, aux_loss_terms, collect_aux_loss, reset_routing_stats, routing_stats

__all__ = [
    "Experts", "MoE", "Router", "Routing", "after_optimizer_step", "aux_loss_terms", "collect_aux_loss",
    "reset_routing_stats", "routing_stats",
]
