"""LocMoE+: token–expert affinity, global rearrangement by affinity and a re-estimated capacity
bound (Li, Sun, Lin, He, Lin, Zheng, Zeng, Zhao, Chen, "LocMoE+: Enhanced Router with Token Feature
Awareness for Efficient LLM Pre-Training", arXiv 2406.00023, 2024), on top of LocMoE's locality
(``core.routers.locmoe``).

For a routing group of S tokens:

- affinity ``a_{s,e} = cos(x_s, w_e) = x_s·w_e / (‖x_s‖‖w_e‖)`` with orthogonally initialised gate
  vectors w_e; gate ``g_s = softmax(a_s / t)`` (``temperature`` t);
- candidates: each token's top-K experts by ``a + β·1[local]`` (LocMoE's local bias β), kept only
  when ``a_{s,e} ≥ affinity_threshold`` (a token does not go to an expert it points away from);
- global rearrangement: every expert takes, among all of the group's candidates for it, the C of
  highest affinity (wherever they sit in the sequence; not first come, first served);
- capacity ``C = min(max(C_min, min_capacity), ceil(S·K·cf/E))`` with LocMoE's bound
  ``C_min = ⌈S · A_D(δ̂)⌉`` (``core.routers.locmoe.capacity_lower_bound``) at an estimate δ̂ of the
  maximal angular deviation between the candidates and their experts' gate vectors. δ̂ starts at π/2
  and is re-estimated after every optimizer step as ``δ̂ ← m·δ̂ + (1−m)·δ`` with δ the largest
  deviation seen in the training forwards since the previous step (``angle_momentum`` m): as the
  tokens gather around their experts' gate vectors, δ and with it the capacity fall;
- combine weights ``g_{s,e}``; dropped candidates count as drops; LocMoE's locality loss and the
  Switch balance loss.

Not causal: an expert's choice among its candidates depends on the whole group. The capacity is read
on the host at every forward (one synchronisation).

Legend: G groups, S tokens per group, D width, E experts, K experts per token, C capacity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.routers.base import check_finite, check_positive_int, compute_capacity, select_expert_choice
from core.routers.locmoe import LocMoERouter, capacity_lower_bound, locality_loss, max_angular_deviation
from core.routing import Routing


class LocMoEPlusRouter(LocMoERouter):
    """Affinity candidates, expert-side rearrangement by affinity, adaptive capacity bound.

    Args:
        dim: D.
        num_experts: E.
        top_k: K candidate experts per token.
        capacity_factor: cf of the capacity's upper limit ``ceil(S·K·cf/E)`` (None: S).
        temperature: t of the gate softmax over affinities (> 0).
        affinity_threshold: least affinity of a candidate, in [-1, 1].
        min_capacity: least capacity (>= 1).
        angle_momentum: m of the δ̂ update, in [0, 1).
        num_ranks, local_bias, locality_loss_weight, switch_loss_weight, importance_loss_weight:
            as ``LocMoERouter``.
    """

    token_local = False

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, capacity_factor: float | None = 1.05,
                 temperature: float = 0.1, affinity_threshold: float = 0.0, min_capacity: int = 1,
                 angle_momentum: float = 0.9, num_ranks: int = 2, local_bias: float = 0.0,
                 locality_loss_weight: float = 0.01, switch_loss_weight: float = 0.01,
                 importance_loss_weight: float = 0.0):
        super().__init__(dim, num_experts, top_k=top_k, capacity_factor=capacity_factor, num_ranks=num_ranks,
                         local_bias=local_bias, locality_loss_weight=locality_loss_weight,
                         switch_loss_weight=switch_loss_weight, importance_loss_weight=importance_loss_weight)
        check_finite("temperature", temperature, gt=0)
        check_finite("affinity_threshold", affinity_threshold, ge=-1)
        if affinity_threshold > 1:
            raise ValueError(f"affinity_threshold={affinity_threshold} is not allowed: it must be in [-1, 1] "
                             "(a cosine).")
        check_finite("angle_momentum", angle_momentum, ge=0)
        if angle_momentum >= 1:
            raise ValueError(f"angle_momentum={angle_momentum} is not allowed: it must be < 1 (at 1 the "
                             "estimate never moves).")
        self.temperature = float(temperature)
        self.affinity_threshold = float(affinity_threshold)
        self.min_capacity = check_positive_int("min_capacity", min_capacity)
        self.angle_momentum = float(angle_momentum)
        # δ̂ is saved with the model; the deviation seen since the last step is not. A model cast to
        # bf16 holds δ̂ to about 0.01 rad, which moves the capacity by well under a token per 100.
        self.register_buffer("angle_estimate", torch.tensor(math.pi / 2, dtype=torch.float32))
        self.register_buffer("pending_angle", torch.tensor(-1.0, dtype=torch.float32), persistent=False)

    @property
    def is_causal(self) -> bool:
        return False

    def capacity(self, group_size: int) -> int:
        """``min(max(C_min(δ̂), min_capacity), ceil(S·K·cf/E))`` for groups of S tokens."""
        upper = group_size if self.capacity_factor is None else \
            compute_capacity(group_size * self.top_k, self.num_experts, self.capacity_factor)
        bound = capacity_lower_bound(group_size, self.dim, float(self.angle_estimate))
        return max(1, min(max(bound, self.min_capacity), upper, group_size))

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        with torch.autocast(device_type=x_GSD.device.type, enabled=False):
            affinity_GSE = nn.functional.normalize(x_GSD.float(), dim=-1) @ \
                nn.functional.normalize(self.weight.float(), dim=-1).t()
        logits_GSE = affinity_GSE / self.temperature
        gates_GSE = torch.softmax(logits_GSE, dim=-1)
        local_SE = self.local_experts(S, x_GSD.device)
        select_GSE = affinity_GSE.detach() + self.local_bias * local_SE
        top_idx_GSK = select_GSE.topk(self.top_k, dim=-1).indices
        candidate_GSE = torch.zeros_like(gates_GSE, dtype=torch.bool).scatter(-1, top_idx_GSK, True)
        if mask_GS is not None:
            candidate_GSE = candidate_GSE & mask_GS[..., None]
        eligible_GSE = candidate_GSE & (affinity_GSE.detach() >= self.affinity_threshold)
        routing = select_expert_choice(affinity_GSE.detach(), gates_GSE, self.capacity(S), mask_GS,
                                       eligible_GSE=eligible_GSE, scores_GSE=gates_GSE)
        routing.num_choices = candidate_GSE.sum()  # candidates not taken are drops
        routing.extras["local_SE"] = local_SE
        token_N, expert_N = eligible_GSE.reshape(G * S, -1).nonzero(as_tuple=True)
        delta = max_angular_deviation(x_GSD.reshape(G * S, -1), self.weight, token_N, expert_N)
        routing.extras["max_angle"] = delta
        self.aux_losses = {}
        if self.training:
            if token_N.numel():  # a group of padding alone says nothing about the deviation
                with torch.no_grad():
                    self.pending_angle.copy_(torch.maximum(self.pending_angle, delta))
            self.aux_losses = self._aux_losses(logits_GSE, logits_GSE, gates_GSE, mask_GS)
            if self.locality_loss_weight:
                self.aux_losses["locality"] = self.locality_loss_weight * locality_loss(gates_GSE, local_SE, mask_GS)
        return routing

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """``δ̂ ← m·δ̂ + (1−m)·δ`` with δ the largest deviation since the last call; resets δ."""
        if bool(self.pending_angle >= 0):
            m = self.angle_momentum
            self.angle_estimate.copy_(m * self.angle_estimate + (1 - m) * self.pending_angle)
        self.pending_angle.fill_(-1.0)
