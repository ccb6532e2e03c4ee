"""GShard top-2 gating with random routing (Lepikhin et al., "GShard", ICLR 2021; the form of
fairseq's and torchscale's ``top2gating``).

``g = softmax(x W)``; e1 = argmax g, e2 = argmax of g without e1; the two gates are normalised,
``g1 ← g1/(g1+g2)``, ``g2 ← g2/(g1+g2)``; in training the token goes to e2 only if
``2·g2 > u``, ``u ~ U(0,1)`` (so with probability 2·g2 ≤ 1). A kept gate is not renormalised when the
second expert is skipped (the token's output is ``g1·f_e1(x)``). Capacity per expert and group is
``C = ceil(2·S·cf/E)`` (``2S/E`` at cf = 1), filled with every first choice before any second choice.
Balance loss: ``mean_e(f1_e · P_e)·E²`` (f1: top-1 fractions), weight 1e-2.

At evaluation the draw is replaced by a fixed rule (``eval_second_expert``): ``"always"`` keeps e2
(the expected-compute upper bound, and what the GShard eval path does) or ``"threshold"`` keeps it
when ``2·g2 > 1/2``, the training rule at the median draw.

Legend: G groups, S tokens per group, D width, E experts.
"""

from __future__ import annotations

import torch

from core import losses
from core.routers.base import (
    Router, TokenChoiceCapacity, check_bool, check_capacity_factor, check_finite, check_positive_int,
    init_router_weight, select_token_choice,
)
from core.routers.batch_priority import check_batch_priority
from core.routing import Routing


class GShardRouter(TokenChoiceCapacity, Router):
    """GShard top-2 with random routing of the second expert.

    Args:
        dim: D.
        num_experts: E (>= 2).
        capacity_factor: cf > 0, C = ceil(2·S·cf/E); None for dropless routing.
        capacity_multiple_of: round C up to a multiple of this.
        batch_priority: Batch Prioritized Routing (V-MoE, Riquelme et al. 2021): tokens claim buffer
            slots by descending top-1 gate; needs a capacity (``core.routers.batch_priority``).
        random_routing: draw the second expert with probability 2·g2 in training (else always keep it).
        eval_second_expert: ``"always"`` or ``"threshold"`` (keep e2 iff 2·g2 > 1/2) at evaluation.
        gshard_loss_weight: weight of the GShard balance loss.
        z_loss_weight: weight of the router z-loss (0 = off).
    """

    family = "token choice"

    def __init__(self, dim: int, num_experts: int, capacity_factor: float | None = 1.0,
                 capacity_multiple_of: int = 1, random_routing: bool = True,
                 eval_second_expert: str = "always", gshard_loss_weight: float = 1e-2,
                 z_loss_weight: float = 0.0, batch_priority: bool = False):
        super().__init__(dim, num_experts)
        check_positive_int("num_experts", num_experts, minimum=2)
        if eval_second_expert not in ("always", "threshold"):
            raise ValueError(f"eval_second_expert={eval_second_expert!r} is not allowed: use 'always' or 'threshold'.")
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.capacity_multiple_of = check_positive_int("capacity_multiple_of", capacity_multiple_of)
        self.batch_priority = check_batch_priority(batch_priority, capacity_factor, type(self).__name__)
        self.random_routing = check_bool("random_routing", random_routing)
        check_finite("gshard_loss_weight", gshard_loss_weight, ge=0)
        check_finite("z_loss_weight", z_loss_weight, ge=0)
        self.eval_second_expert = eval_second_expert
        self.gshard_loss_weight = gshard_loss_weight
        self.z_loss_weight = z_loss_weight
        self.weight = init_router_weight(num_experts, dim)

    @property
    def experts_per_token(self) -> int:
        return 2  # top-2 (the second choice may be dropped by random routing, but it is counted)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.linear_logits(x_GSD, self.weight)
        gates_GSE = torch.softmax(logits_GSE, dim=-1)
        top_GS2 = torch.topk(gates_GSE, 2, dim=-1)
        norm_GS2 = top_GS2.values / top_GS2.values.sum(-1, keepdim=True)
        g2_GS = norm_GS2[..., 1].detach()
        if self.training and self.random_routing:
            keep2_GS = 2.0 * g2_GS > torch.rand_like(g2_GS)
        elif self.training or self.eval_second_expert == "always":
            keep2_GS = torch.ones_like(g2_GS, dtype=torch.bool)
        else:
            keep2_GS = 2.0 * g2_GS > 0.5
        combine_GSE = torch.zeros_like(gates_GSE).scatter(-1, top_GS2.indices, norm_GS2)
        # the first choice is always eligible; a second choice that lost its draw is no choice at all
        keep_GS2 = torch.stack([torch.ones_like(keep2_GS), keep2_GS], dim=-1)
        eligible_GSE = torch.zeros_like(gates_GSE, dtype=torch.bool).scatter(-1, top_GS2.indices, keep_GS2)
        routing = select_token_choice(gates_GSE, combine_GSE, 2, self.capacity(x_GSD.shape[1]),
                                      self.batch_priority, mask_GS, scores_GSE=gates_GSE, eligible_GSE=eligible_GSE)
        choices_GS = 1 + keep2_GS.long()
        if mask_GS is not None:
            choices_GS = choices_GS * mask_GS
        routing.extras["choices_T"] = choices_GS.reshape(-1)
        self.aux_losses = {}
        if self.training:
            if self.gshard_loss_weight:
                self.aux_losses["gshard"] = self.gshard_loss_weight * losses.gshard_loss(gates_GSE, mask_GS)
            if self.z_loss_weight:
                self.aux_losses["z"] = self.z_loss_weight * losses.z_loss(logits_GSE, mask_GS)
        return routing
