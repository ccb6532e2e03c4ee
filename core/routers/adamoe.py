"""AdaMoE: token-adaptive routing with null experts (Zeng, Miao, Gao, Zhang, Deng, "AdaMoE:
Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language Models", Findings of
EMNLP 2024).

The router scores n true + m null experts, ``p = softmax(x W)`` over n + m, and each token takes its
top-K of all n + m. Null experts are the zero function: a null choice is no assignment, so it costs
no FLOPs, and a token that picks only nulls gets output 0 (the residual carries it). The gates of the
selected true experts are renormalised to sum to 1 over those experts. A larger K with m nulls gives
a token-dependent number of true experts (about ``K·n/(n+m)`` on average at balance). Balance:
the null-aware Switch loss (``core.losses.null_aware_switch_loss``: null loads replaced by their
mean), weight ~1e-3.

``Routing.num_experts`` is n (the layer runs n experts); ``routing.extras`` holds
``true_experts_per_token`` (mean over valid tokens), ``true_experts_T`` and ``null_prob_GS`` (the
router mass on null experts).

Legend: G groups, S tokens per group, D width, E = n true experts, X = n + m router outputs,
K choices per token.
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


class AdaMoERouter(TokenChoiceCapacity, Router):
    """Top-K over n true + m null experts; nulls cost nothing and output 0.

    Args:
        dim: D.
        num_experts: n true experts.
        num_null_experts: m null experts (AdaMoE on Mixtral: 16 for n = 8).
        top_k: K choices among n + m (AdaMoE on Mixtral: 4, up from 2).
        capacity_factor: cf > 0 for a true expert's capacity ``ceil(S·K·cf/(n+m))`` (each of the
            n + m outputs gets ``S·K/(n+m)`` choices at balance), or None for dropless routing.
        batch_priority: Batch Prioritized Routing (V-MoE, Riquelme et al. 2021): tokens claim buffer
            slots by descending true-expert probability; needs a capacity (``core.routers.batch_priority``).
        noise_std: Gaussian logit noise in training, σ = noise_std / (n+m).
        load_loss_weight: weight of the null-aware Switch loss (1e-3; 1e-4 for Mixtral fine-tuning).
    """

    family = "token choice"

    def __init__(self, dim: int, num_experts: int, num_null_experts: int = 8, top_k: int = 4,
                 capacity_factor: float | None = None, noise_std: float = 0.0, load_loss_weight: float = 1e-3,
                 batch_priority: bool = False):
        super().__init__(dim, num_experts)
        self.num_null_experts = check_positive_int("num_null_experts", num_null_experts, minimum=0)
        check_positive_int("top_k", top_k)
        total = num_experts + num_null_experts
        if top_k > total:
            raise ValueError(f"top_k={top_k} is not allowed: it must be <= num_experts + num_null_experts={total}.")
        check_finite("noise_std", noise_std, ge=0)
        check_finite("load_loss_weight", load_loss_weight, ge=0)
        self.top_k = top_k
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.batch_priority = check_batch_priority(batch_priority, capacity_factor, type(self).__name__)
        self.noise_std = noise_std
        self.load_loss_weight = load_loss_weight
        self.weight = init_router_weight(total, dim)

    @property
    def capacity_experts(self) -> int:
        return self.num_experts + self.num_null_experts  # a null expert's slots count like a real one's

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        E, K = self.num_experts, self.top_k
        logits_GSX = self.linear_logits(x_GSD, self.weight)
        if self.training and self.noise_std > 0:
            logits_GSX = logits_GSX + torch.randn_like(logits_GSX) * (self.noise_std / logits_GSX.shape[-1])
        probs_GSX = torch.softmax(logits_GSX, dim=-1)
        top_idx_GSK = probs_GSX.topk(K, dim=-1).indices
        chosen_GSX = torch.zeros_like(probs_GSX, dtype=torch.bool).scatter(-1, top_idx_GSK, True)
        chosen_GSE = chosen_GSX[..., :E]
        probs_GSE = probs_GSX[..., :E]
        # renormalise over the selected true experts only (denominator 1 when none was chosen)
        denom_GS1 = (probs_GSE * chosen_GSE).sum(-1, keepdim=True)
        gates_GSE = probs_GSE / torch.where(denom_GS1 > 0, denom_GS1, torch.ones_like(denom_GS1))
        # A true expert in the top-K of all n+m is also in the top-min(K,n) of the true experts, so
        # selecting there and keeping only the chosen ones lists exactly the true choices.
        true_probs_GSE = probs_GSE / probs_GSE.sum(-1, keepdim=True).clamp_min(1e-20)
        routing = select_token_choice(probs_GSE, gates_GSE, min(K, E), self.capacity(x_GSD.shape[1]),
                                      self.batch_priority, mask_GS, scores_GSE=true_probs_GSE, eligible_GSE=chosen_GSE)
        true_GS = chosen_GSE.sum(-1)
        if mask_GS is not None:
            true_GS = true_GS * mask_GS
        n_valid = true_GS.numel() if mask_GS is None else mask_GS.sum().clamp_min(1)
        routing.extras.update(
            choices_T=true_GS.reshape(-1),
            true_experts_T=true_GS.reshape(-1),
            true_experts_per_token=true_GS.sum() / n_valid,
            null_prob_GS=probs_GSX[..., E:].sum(-1).detach(),
            top_k=K,
        )
        self.aux_losses = {}
        if self.training and self.load_loss_weight:
            self.aux_losses["null_aware_switch"] = self.load_loss_weight * losses.null_aware_switch_loss(
                probs_GSX, top_idx_GSK, self.num_null_experts, mask_GS)
        return routing
