"""Sparsity-constrained expert choice (Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal
Transport", ICLR 2023; router study, TMLR 2024): a squared-ℓ2 transport plan of ``softmax(z)`` with
at most k = C nonzeros per expert column; each expert takes the nonzero tokens of its column (at
most C), never a zero-plan token; the combine gate is ``softmax(z)``.

Legend: G groups, S tokens per group, D width, E experts, C capacity.
"""

from __future__ import annotations

import torch

from core.routers.base import check_finite, check_positive_int, select_expert_choice
from core.routers.expert_choice import ExpertChoiceRouter
from core.routing import Routing
from core.transport import ksparse_plan


class SparseExpertChoiceRouter(ExpertChoiceRouter):
    """Sparsity-constrained expert choice. Arguments as ``ExpertChoiceRouter`` plus the semi-dual
    solver's ``num_steps`` and ``lr`` (vmoe: 20 Adam steps, lr 1e-2) and the regulariser ``gamma``."""

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 2.0,
                 capacity_multiple_of: int = 1, noise_std: float = 1.0, num_steps: int = 20,
                 lr: float = 1e-2, gamma: float = 1.0):
        super().__init__(dim, num_experts, capacity_factor, capacity_multiple_of, noise_std)
        check_positive_int("num_steps", num_steps)
        check_finite("lr", lr, gt=0)
        check_finite("gamma", gamma, gt=0)
        self.num_steps, self.lr, self.gamma = num_steps, lr, gamma

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.add_noise(self.linear_logits(x_GSD, self.weight), self.noise_std)
        gates_GSE = torch.softmax(logits_GSE, dim=-1)
        capacity = min(self.capacity(x_GSD.shape[1]), x_GSD.shape[1])
        plan_GSE = ksparse_plan(gates_GSE, capacity, sparse_rows=False, mask_GS=mask_GS,
                                num_steps=self.num_steps, lr=self.lr, gamma=self.gamma)
        self.aux_losses = {}
        routing = select_expert_choice(plan_GSE, gates_GSE, capacity, mask_GS, eligible_GSE=plan_GSE > 0)
        routing.extras["plan_GSE"] = plan_GSE
        routing.extras["nonzero_limit"] = ("column", capacity)
        return routing
