"""Sinkhorn expert choice (router study, Liu, Blondel, Riquelme, Puigcerver, TMLR 2024; vmoe's
``KLProjectionNoisyTopItemsPerExpertRouter``): each expert takes its top-C tokens of the entropic
transport plan of ``exp(z)``; the combine gate is ``softmax(z)``.

Legend: G groups, S tokens per group, D width, E experts, C capacity.
"""

from __future__ import annotations

import torch

from core.routers.base import check_positive_int, select_expert_choice
from core.routers.expert_choice import ExpertChoiceRouter
from core.routing import Routing
from core.transport import sinkhorn_plan


class SinkhornExpertChoiceRouter(ExpertChoiceRouter):
    """Sinkhorn expert choice. Arguments as ``ExpertChoiceRouter`` plus ``num_iters``."""

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 2.0,
                 capacity_multiple_of: int = 1, noise_std: float = 1.0, num_iters: int = 20):
        super().__init__(dim, num_experts, capacity_factor, capacity_multiple_of, noise_std)
        self.num_iters = check_positive_int("num_iters", num_iters)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.add_noise(self.linear_logits(x_GSD, self.weight), self.noise_std)
        plan_GSE = sinkhorn_plan(logits_GSE, mask_GS, self.num_iters)
        gates_GSE = torch.softmax(logits_GSE, dim=-1)
        self.aux_losses = {}
        routing = select_expert_choice(plan_GSE, gates_GSE, self.capacity(x_GSD.shape[1]), mask_GS)
        routing.extras["plan_GSE"] = plan_GSE
        return routing
