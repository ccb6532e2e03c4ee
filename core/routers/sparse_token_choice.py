"""Sparsity-constrained token choice (Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal
Transport", ICLR 2023): a squared-ℓ2 transport plan of ``softmax(z)`` with at most K nonzeros per
token row; each token takes the nonzero experts of its row (at most K), filling buffers with the
token-choice rule (capacity, optional BPR); the combine gate is ``softmax(z)``.

Legend: G groups, S tokens per group, D width, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from core.routers.base import check_finite, check_positive_int, select_token_choice
from core.routers.topk import TopKRouter
from core.routing import Routing
from core.transport import ksparse_plan


class SparseTokenChoiceRouter(TopKRouter):
    """Sparsity-constrained token choice. Arguments as ``TopKRouter`` plus the semi-dual solver's
    ``num_steps``, ``lr`` and ``gamma``; auxiliary losses default to 0."""

    token_local = False

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, capacity_factor: float | None = 1.05,
                 capacity_multiple_of: int = 1, batch_priority: bool = False, noise_std: float = 1.0,
                 num_steps: int = 20, lr: float = 1e-2, gamma: float = 1.0):
        super().__init__(dim, num_experts, top_k=top_k, capacity_factor=capacity_factor,
                         capacity_multiple_of=capacity_multiple_of, batch_priority=batch_priority,
                         noise_std=noise_std, importance_loss_weight=0.0, load_loss_weight=0.0)
        check_positive_int("num_steps", num_steps)
        check_finite("lr", lr, gt=0)
        check_finite("gamma", gamma, gt=0)
        self.num_steps, self.lr, self.gamma = num_steps, lr, gamma

    @property
    def is_causal(self) -> bool:
        return False

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.add_noise(self.linear_logits(x_GSD, self.weight), self.noise_std)
        gates_GSE = torch.softmax(logits_GSE, dim=-1)
        plan_GSE = ksparse_plan(gates_GSE, self.top_k, sparse_rows=True, mask_GS=mask_GS,
                                num_steps=self.num_steps, lr=self.lr, gamma=self.gamma)
        self.aux_losses = {}
        routing = select_token_choice(plan_GSE, gates_GSE, self.top_k, self.capacity(x_GSD.shape[1]),
                                      self.batch_priority, mask_GS, eligible_GSE=plan_GSE > 0)
        routing.extras["plan_GSE"] = plan_GSE
        routing.extras["nonzero_limit"] = ("row", self.top_k)
        return routing
