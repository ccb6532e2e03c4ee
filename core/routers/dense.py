"""Dense gating: every token goes to every expert, weighted by ``softmax(x W)`` (the dense MoE of
Jacobs et al. 1991 and the gate of MMoE, Ma et al., KDD 2018). Nothing is dropped.

Legend: G groups, S tokens per group, D width, E experts.
"""

from __future__ import annotations

import torch

from core.routers.base import Router, check_finite, init_router_weight
from core.routing import Routing


class DenseRouter(Router):
    """All experts, softmax weights.

    Args:
        dim: D.
        num_experts: E.
        temperature: softmax temperature (> 0).
    """

    def __init__(self, dim: int, num_experts: int, temperature: float = 1.0):
        super().__init__(dim, num_experts)
        check_finite("temperature", temperature, gt=0)
        self.temperature = temperature
        self.weight = init_router_weight(num_experts, dim)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        E = self.num_experts
        gates_GSE = torch.softmax(self.linear_logits(x_GSD, self.weight) / self.temperature, dim=-1)
        token_N = torch.arange(G * S, device=x_GSD.device).repeat_interleave(E)
        expert_N = torch.arange(E, device=x_GSD.device).repeat(G * S)
        weight_N = gates_GSE.reshape(-1)
        num_choices: int | torch.Tensor = G * S * E
        if mask_GS is not None:
            keep_N = mask_GS.reshape(-1).repeat_interleave(E)
            token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
            num_choices = keep_N.sum()
        self.aux_losses = {}
        return Routing(
            num_groups=G, group_size=S, num_experts=E, token_idx_N=token_N, expert_idx_N=expert_N,
            weight_N=weight_N, capacity=None, num_choices=num_choices, scores_GSE=gates_GSE, mask_GS=mask_GS,
        )
