"""SMEAR: soft merging of experts with adaptive routing (Muqeeth, Liu, Raffel, "Soft Merging of
Experts with Adaptive Routing", TMLR 2024).

One routing decision per group (example): ``p = softmax(W·mean_s x_s)`` over the group's valid
tokens; the group runs one FFN whose parameters are the merge ``θ̄ = Σ_e p_e θ_e`` (the MoE layer's
``Experts.forward_merged``). Fully differentiable at the compute of a single expert; no auxiliary
loss. Not causal: the mean covers the whole group.

Legend: G groups, S tokens per group, D width, E experts.
"""

from __future__ import annotations

import torch

from core.routers.base import Router, check_finite, init_router_weight
from core.routers.sentence import masked_group_mean
from core.routing import Routing


class SmearRouter(Router):
    """Merge weights from the mean token of each group.

    Args:
        dim: D.
        num_experts: E.
        temperature: softmax temperature (> 0).
    """

    family = "merging"
    token_local = False
    supports_expert_parallel = False
    mixes_tokens = True

    def __init__(self, dim: int, num_experts: int, temperature: float = 1.0):
        super().__init__(dim, num_experts)
        check_finite("temperature", temperature, gt=0)
        self.temperature = float(temperature)
        self.weight = init_router_weight(num_experts, dim)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        logits_GE = self.linear_logits(masked_group_mean(x_GSD.float(), mask_GS), self.weight)
        merge_GE = torch.softmax(logits_GE / self.temperature, dim=-1)
        self.aux_losses = {}
        return Routing(num_groups=G, group_size=S, num_experts=self.num_experts, merge_GE=merge_GE,
                       scores_GSE=merge_GE[:, None].expand(G, S, self.num_experts), mask_GS=mask_GS)
