"""Softmax expert choice (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS
2022; the router study's variant, Liu et al., TMLR 2024): every expert takes its top-C tokens by
``softmax(x W + ε)``, ``C = ceil(S·cf/E)``; the combine gate is the selected softmax value. A token
may be taken by several experts or by none. Not token-local: a token's experts depend on the other
tokens of its group, so it sees the future in a causal model.

Legend: G groups, S tokens per group, D width, E experts, C capacity.
"""

from __future__ import annotations

import torch

from core.routers.base import (
    Router, check_capacity_factor, check_finite, check_positive_int, compute_capacity, init_router_weight,
    select_expert_choice,
)
from core.routing import Routing


class ExpertChoiceRouter(Router):
    """Softmax expert choice.

    Args:
        dim: D.
        num_experts: E.
        capacity_factor: cf > 0; C = ceil(S·cf/E). cf = 2 matches top-2 compute (Zhou et al.).
        capacity_multiple_of: round C up to a multiple of this.
        noise_std: training noise, σ = noise_std / E.
    """

    token_local = False

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 2.0,
                 capacity_multiple_of: int = 1, noise_std: float = 1.0):
        super().__init__(dim, num_experts)
        if capacity_factor is None:
            raise ValueError("capacity_factor=None is not allowed for expert choice: give a number > 0.")
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.capacity_multiple_of = check_positive_int("capacity_multiple_of", capacity_multiple_of)
        self.noise_std = check_finite("noise_std", noise_std, ge=0)
        self.weight = init_router_weight(num_experts, dim)

    def capacity(self, group_size: int) -> int:
        return compute_capacity(group_size, self.num_experts, self.capacity_factor, self.capacity_multiple_of)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.add_noise(self.linear_logits(x_GSD, self.weight), self.noise_std)
        gates_GSE = torch.softmax(logits_GSE, dim=-1)
        self.aux_losses = {}
        return select_expert_choice(gates_GSE, gates_GSE, self.capacity(x_GSD.shape[1]), mask_GS)
