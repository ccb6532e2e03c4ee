"""Softmax token choice: the V-MoE router (Riquelme et al., "Scaling Vision with Sparse Mixture of
Experts", NeurIPS 2021), with Mixtral-style renormalisation as an option (Jiang et al., 2024).

``g = softmax(x W + ε)`` with ``ε ~ N(0, (noise_std/E)²)`` in training; each token takes its top-K
experts; buffers of ``C = ceil(S·K·cf/E)`` slots are filled K-major, optionally with Batch
Prioritized Routing; the combine gate is the selected softmax value (V-MoE, not renormalised) or the
softmax over the K selected logits (``renormalize=True``, Mixtral).

Legend: G groups, S tokens per group, D width, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from core import losses
from core.routers.batch_priority import check_batch_priority
from core.routers.base import (
    Router, TokenChoiceCapacity, check_bool, check_capacity_factor, check_finite, check_positive_int,
    init_router_weight, select_token_choice,
)
from core.routing import Routing


class TopKRouter(TokenChoiceCapacity, Router):
    """Softmax token choice (V-MoE) / renormalised top-k (Mixtral).

    Args:
        dim: D.
        num_experts: E.
        top_k: K experts per token (1 <= K <= E).
        capacity_factor: cf > 0 (V-MoE trains at 1.05), or None for dropless routing.
        capacity_multiple_of: round C up to a multiple of this (vmoe uses 4).
        batch_priority: Batch Prioritized Routing (tokens with the highest top-1 gate claim slots first).
        noise_std: training noise, σ = noise_std / E (V-MoE: 1.0).
        renormalize: combine gates = softmax over the K selected logits (Mixtral).
        importance_loss_weight, load_loss_weight: V-MoE auxiliary losses (0.005 each).
        switch_loss_weight, gshard_loss_weight, z_loss_weight: other balance losses (0 by default).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = 1.05,
        capacity_multiple_of: int = 1,
        batch_priority: bool = False,
        noise_std: float = 1.0,
        renormalize: bool = False,
        importance_loss_weight: float = 0.005,
        load_loss_weight: float = 0.005,
        switch_loss_weight: float = 0.0,
        gshard_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ):
        super().__init__(dim, num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is not allowed: it must be <= num_experts={num_experts}.")
        check_finite("noise_std", noise_std, ge=0)
        self.top_k = top_k
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.capacity_multiple_of = check_positive_int("capacity_multiple_of", capacity_multiple_of)
        self.batch_priority = check_batch_priority(batch_priority, self.capacity_factor, type(self).__name__)
        self.noise_std = noise_std
        self.renormalize = check_bool("renormalize", renormalize)
        for name, weight in (("importance_loss_weight", importance_loss_weight), ("load_loss_weight", load_loss_weight),
                             ("switch_loss_weight", switch_loss_weight), ("gshard_loss_weight", gshard_loss_weight),
                             ("z_loss_weight", z_loss_weight)):
            check_finite(name, weight, ge=0)
        self.loss_weights = dict(
            importance=importance_loss_weight, load=load_loss_weight, switch=switch_loss_weight,
            gshard=gshard_loss_weight, z=z_loss_weight,
        )
        self.weight = init_router_weight(num_experts, dim)

    def check_options(self) -> None:
        if self.loss_weights["load"] and not self.noise_std:
            raise ValueError(f"load_loss_weight={self.loss_weights['load']} is not allowed: {type(self).__name__}'s "
                             "load loss is the probability of a choice under the training noise, and noise_std=0 adds "
                             "none, so the loss is never computed; set noise_std > 0 (V-MoE: 1.0) or "
                             "load_loss_weight=0.")
        super().check_options()

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.linear_logits(x_GSD, self.weight)
        noisy_GSE = self.add_noise(logits_GSE, self.noise_std)
        gates_GSE = torch.softmax(noisy_GSE, dim=-1)
        # renormalize: softmax over the selected logits == selected softmax values over their sum
        routing = select_token_choice(
            gates_GSE, gates_GSE, self.top_k, self.capacity(x_GSD.shape[1]),
            self.batch_priority, mask_GS, scores_GSE=gates_GSE, renormalize=self.renormalize,
        )
        self.aux_losses = self._aux_losses(logits_GSE, noisy_GSE, gates_GSE, mask_GS) if self.training else {}
        return routing

    def _aux_losses(self, logits_GSE, noisy_GSE, gates_GSE, mask_GS) -> dict[str, torch.Tensor]:
        w = self.loss_weights
        out = {}
        if w["importance"]:
            out["importance"] = w["importance"] * losses.importance_loss(torch.softmax(logits_GSE, -1), mask_GS)
        if w["load"] and self.noise_std > 0:
            sigma = self.noise_std / self.num_experts
            out["load"] = w["load"] * losses.load_loss(logits_GSE, noisy_GSE, sigma, self.top_k, mask_GS)
        if w["switch"]:
            idx_GSK = torch.topk(gates_GSE, self.top_k, dim=-1).indices
            out["switch"] = w["switch"] * losses.switch_loss(gates_GSE, idx_GSK, mask_GS)
        if w["gshard"]:
            out["gshard"] = w["gshard"] * losses.gshard_loss(gates_GSE, mask_GS)
        if w["z"]:
            out["z"] = w["z"] * losses.z_loss(logits_GSE, mask_GS)
        return out
