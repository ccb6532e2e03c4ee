"""Sinkhorn token choice (router study, Liu, Blondel, Riquelme, Puigcerver, TMLR 2024; vmoe's
``KLProjectionNoisyTopExpertsPerItemRouter``): the entropic transport plan P of ``exp(z)`` (rows 1,
columns S/E, 20 Sinkhorn iterations) selects the top-K experts per token (capacity, optional BPR);
the combine gate is ``softmax(z)`` at the selected entries. Not token-local: the plan balances
columns over the whole group.

Legend: G groups, S tokens per group, D width, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from core.routers.base import check_positive_int, select_token_choice
from core.routers.topk import TopKRouter
from core.routing import Routing
from core.transport import sinkhorn_plan


class SinkhornTokenChoiceRouter(TopKRouter):
    """Sinkhorn token choice. Arguments as ``TopKRouter`` plus ``num_iters`` (Sinkhorn iterations);
    the auxiliary losses default to 0 (the plan balances the load)."""

    token_local = False

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, capacity_factor: float | None = 1.05,
                 capacity_multiple_of: int = 1, batch_priority: bool = False, noise_std: float = 1.0,
                 num_iters: int = 20, importance_loss_weight: float = 0.0, load_loss_weight: float = 0.0):
        super().__init__(dim, num_experts, top_k=top_k, capacity_factor=capacity_factor,
                         capacity_multiple_of=capacity_multiple_of, batch_priority=batch_priority,
                         noise_std=noise_std, importance_loss_weight=importance_loss_weight,
                         load_loss_weight=load_loss_weight)
        self.num_iters = check_positive_int("num_iters", num_iters)

    @property
    def is_causal(self) -> bool:
        return False

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.linear_logits(x_GSD, self.weight)
        noisy_GSE = self.add_noise(logits_GSE, self.noise_std)
        plan_GSE = sinkhorn_plan(noisy_GSE, mask_GS, self.num_iters)
        gates_GSE = torch.softmax(noisy_GSE, dim=-1)
        routing = select_token_choice(plan_GSE, gates_GSE, self.top_k, self.capacity(x_GSD.shape[1]),
                                      self.batch_priority, mask_GS)
        routing.extras["plan_GSE"] = plan_GSE
        self.aux_losses = self._aux_losses(logits_GSE, noisy_GSE, gates_GSE, mask_GS) if self.training else {}
        return routing
