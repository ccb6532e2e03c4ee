"""X-MoE routing on a low-dimensional hypersphere (Chi et al., "On the Representation Collapse of
Sparse Mixture of Experts", NeurIPS 2022).

Tokens are projected to ``d_e`` dimensions (16), and the score of expert i is the cosine similarity
to its l2-normalised embedding divided by a learnable temperature τ:
``s_i = ⟨W x, e_i⟩ / (‖W x‖·‖e_i‖·τ)``; ``g = softmax(s)``; top-K token choice with the selected
probability as gate (not renormalised), optional capacity, Switch balance loss. τ is learned as
``log(1/τ)``, clamped to τ >= 0.01, initialised at 0.5 (the cosine router of Tutel; the paper learns
τ but its official code leaves it out).

Legend: G groups, S tokens per group, D width, R = d_e routing dimension, E experts, K experts per token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core import losses
from core.routers.base import (
    Router, TokenChoiceCapacity, check_capacity_factor, check_finite, check_positive_int,
    select_token_choice,
)
from core.routers.batch_priority import check_batch_priority
from core.routing import Routing


class XMoERouter(TokenChoiceCapacity, Router):
    """Cosine routing in a d_e-dimensional space with a learnable temperature.

    Args:
        dim: D.
        num_experts: E.
        top_k: K experts per token (X-MoE: 1).
        routing_dim: d_e, width of the routing space (16).
        temperature_init: initial τ (> 0).
        capacity_factor: cf > 0 for C = ceil(S·K·cf/E), or None for dropless routing.
        batch_priority: Batch Prioritized Routing (V-MoE, Riquelme et al. 2021): tokens claim buffer
            slots by descending top-1 gate; needs a capacity (``core.routers.batch_priority``).
        switch_loss_weight: weight of the Switch balance loss (1e-2).
    """

    family = "token choice"
    max_logit_scale = math.log(100.0)

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, routing_dim: int = 16,
                 temperature_init: float = 0.5, capacity_factor: float | None = None,
                 switch_loss_weight: float = 1e-2, batch_priority: bool = False):
        super().__init__(dim, num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is not allowed: it must be <= num_experts={num_experts}.")
        check_positive_int("routing_dim", routing_dim)
        check_finite("temperature_init", temperature_init, gt=0)
        self.top_k = top_k
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.batch_priority = check_batch_priority(batch_priority, capacity_factor, type(self).__name__)
        self.switch_loss_weight = check_finite("switch_loss_weight", switch_loss_weight, ge=0)
        self.proj_RD = nn.Parameter(torch.randn(routing_dim, dim) / math.sqrt(dim))
        # orthogonal expert embeddings (as the official code) so the experts start well separated
        self.expert_emb_ER = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, routing_dim)))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.logit_scale.clamp(max=self.max_logit_scale).exp()

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        with torch.autocast(device_type=x_GSD.device.type, enabled=False):
            h_GSR = nn.functional.normalize(nn.functional.linear(x_GSD.float(), self.proj_RD.float()), dim=-1)
            emb_ER = nn.functional.normalize(self.expert_emb_ER.float(), dim=-1)
            logits_GSE = (h_GSR @ emb_ER.t()) * self.logit_scale.clamp(max=self.max_logit_scale).exp()
        gates_GSE = torch.softmax(logits_GSE, dim=-1)
        routing = select_token_choice(gates_GSE, gates_GSE, self.top_k, self.capacity(x_GSD.shape[1]),
                                      self.batch_priority, mask_GS)
        self.aux_losses = {}
        if self.training and self.switch_loss_weight:
            idx_GSK = gates_GSE.topk(self.top_k, dim=-1).indices
            self.aux_losses["switch"] = self.switch_loss_weight * losses.switch_loss(gates_GSE, idx_GSK, mask_GS)
        return routing
