"""Hierarchical (two-level) routing, the tree-structured gating of the hierarchical MoE (Jordan &
Jacobs 1994; the two-level sparse gate of Shazeer et al., "Outrageously Large Neural Networks",
ICLR 2017).

The E experts form ``num_expert_groups`` equal groups. A top-level gate ``p1 = softmax(x W1)`` over
groups picks each token's ``top_groups`` groups; inside every chosen group a second gate
``p2 = softmax(x W2)`` restricted to that group picks its ``top_k`` experts. The combine gate of
expert e in group h is ``p1[h]·p2[e | h]``, the probability of the path; the router probability
over all experts is the same product for every (h, e). Capacity optional; Switch balance loss on
the path probabilities.

Legend: G groups (routing), S tokens per group, D width, E experts, H expert groups, J = E/H experts
per expert group.
"""

from __future__ import annotations

import torch

from core import losses
from core.routers.base import (
    Router, TokenChoiceCapacity, check_capacity_factor, check_finite, check_positive_int,
    init_router_weight, select_token_choice,
)
from core.routers.batch_priority import check_batch_priority
from core.routing import Routing


class HierarchicalRouter(TokenChoiceCapacity, Router):
    """Top-level router over expert groups, then top-k inside each chosen group.

    Args:
        dim: D.
        num_experts: E, a multiple of ``num_expert_groups``.
        num_expert_groups: H groups of E/H experts.
        top_groups: groups chosen per token (<= H).
        top_k: experts chosen inside each chosen group (<= E/H); a token uses top_groups·top_k experts.
        capacity_factor: cf > 0 for C = ceil(S·top_groups·top_k·cf/E), or None for dropless routing.
        batch_priority: Batch Prioritized Routing (V-MoE, Riquelme et al. 2021): tokens claim buffer
            slots by descending chosen path probability; needs a capacity (``core.routers.batch_priority``).
        switch_loss_weight: weight of the Switch loss on the path probabilities (1e-2).
    """

    family = "token choice"

    def __init__(self, dim: int, num_experts: int, num_expert_groups: int = 2, top_groups: int = 1,
                 top_k: int = 1, capacity_factor: float | None = None, switch_loss_weight: float = 1e-2,
                 batch_priority: bool = False):
        super().__init__(dim, num_experts)
        H = check_positive_int("num_expert_groups", num_expert_groups)
        if num_experts % H:
            raise ValueError(f"num_expert_groups={H} is not allowed: it must divide num_experts={num_experts}.")
        check_positive_int("top_groups", top_groups)
        if top_groups > H:
            raise ValueError(f"top_groups={top_groups} is not allowed: it must be <= num_expert_groups={H}.")
        check_positive_int("top_k", top_k)
        if top_k > num_experts // H:
            raise ValueError(f"top_k={top_k} is not allowed: it must be <= experts per group={num_experts // H}.")
        self.num_expert_groups, self.top_groups, self.top_k = H, top_groups, top_k
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.batch_priority = check_batch_priority(batch_priority, capacity_factor, type(self).__name__)
        self.switch_loss_weight = check_finite("switch_loss_weight", switch_loss_weight, ge=0)
        self.group_weight = init_router_weight(H, dim)
        self.weight = init_router_weight(num_experts, dim)

    @property
    def experts_per_token(self) -> int:
        return self.top_groups * self.top_k

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        E, H = self.num_experts, self.num_expert_groups
        J = E // H
        p1_GSH = torch.softmax(self.linear_logits(x_GSD, self.group_weight), dim=-1)
        p2_GSHJ = torch.softmax(self.linear_logits(x_GSD, self.weight).view(G, S, H, J), dim=-1)
        path_GSE = (p1_GSH[..., None] * p2_GSHJ).reshape(G, S, E)
        groups_GSt = p1_GSH.topk(self.top_groups, dim=-1).indices
        group_ok_GSH = torch.zeros_like(p1_GSH, dtype=torch.bool).scatter(-1, groups_GSt, True)
        inner_GSHk = p2_GSHJ.topk(self.top_k, dim=-1).indices
        inner_ok_GSHJ = torch.zeros_like(p2_GSHJ, dtype=torch.bool).scatter(-1, inner_GSHk, True)
        chosen_GSE = (group_ok_GSH[..., None] & inner_ok_GSHJ).reshape(G, S, E)
        # chosen paths outrank every other expert (probabilities are > 0 > −1)
        select_GSE = torch.where(chosen_GSE, path_GSE.detach(), torch.full_like(path_GSE, -1.0))
        routing = select_token_choice(select_GSE, path_GSE, self.experts_per_token, self.capacity(S),
                                      self.batch_priority, mask_GS, scores_GSE=path_GSE)
        self.aux_losses = {}
        if self.training and self.switch_loss_weight:
            idx_GSK = select_GSE.topk(self.experts_per_token, dim=-1).indices
            self.aux_losses["switch"] = self.switch_loss_weight * losses.switch_loss(path_GSE, idx_GSK, mask_GS)
        return routing
