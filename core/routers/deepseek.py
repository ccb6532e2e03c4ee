"""DeepSeek routing: sigmoid scores, auxiliary-loss-free bias balancing and group-limited top-k
(DeepSeek-V3, arXiv 2412.19437, §2.1.2; the bias rule of Wang et al., "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts", arXiv 2408.15664), for fine-grained routed experts next
to always-on shared experts (DeepSeekMoE, Dai et al. 2024).

- scores ``s = σ(x W)`` (or ``softmax``, DeepSeek-V2); selection uses ``s + b`` with a float32 bias
  buffer b that never receives gradient; with group-limited routing the E experts form ``n_group``
  groups, each scored by the sum of its two best biased scores, and only the best ``topk_group``
  groups may be chosen;
- combine gates: the selected *unbiased* scores divided by their sum (``renormalize``), times
  ``route_scale``;
- after every optimizer step ``b += γ·sign(mean(c) − c)``, with c the tokens routed to each expert
  since the previous update (counted in a buffer during training forwards, so gradient
  accumulation over several forwards is one update);
- optional sequence-wise balance loss ``α·N_r·Σ_i f_i P_i`` over the normalised scores (α = 1e-4 in
  DeepSeek-V3; 0 here by default).

Shared experts are the MoE layer's ``num_shared_experts``; fine-grained segmentation is the layer's
``num_experts``/``hidden_features`` (``core.lora_experts.fine_grained_experts`` computes them).

Legend: G groups, S tokens per group, D width, E routed experts, K experts per token.
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


class DeepSeekRouter(TokenChoiceCapacity, Router):
    """Sigmoid top-k with a selection-only bias updated outside autograd (DeepSeek-V3).

    Args:
        dim: D.
        num_experts: E routed experts.
        top_k: K routed experts per token.
        score_func: ``"sigmoid"`` (V3) or ``"softmax"`` (DeepSeekMoE / V2).
        route_scale: multiplier of the combine gates (2.5 in the 671B V3 config).
        renormalize: divide the selected scores by their sum (V3: yes).
        n_group: expert groups for group-limited routing (1 = off); must divide E.
        topk_group: groups a token may use (<= n_group).
        bias_update_rate: γ of the bias update (1e-3; 0 freezes the bias).
        capacity_factor: cf > 0 for C = ceil(S·K·cf/E), or None (dropless, as DeepSeek-V3).
        batch_priority: Batch Prioritized Routing (V-MoE, Riquelme et al. 2021): tokens claim buffer
            slots by descending selection score (affinity + bias); needs a capacity (``core.routers.batch_priority``).
        seq_aux_loss_weight: α of the sequence-wise balance loss (0 = off; V3 uses 1e-4).
    """

    family = "token choice"

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, score_func: str = "sigmoid",
                 route_scale: float = 1.0, renormalize: bool = True, n_group: int = 1, topk_group: int = 1,
                 bias_update_rate: float = 1e-3, capacity_factor: float | None = None,
                 seq_aux_loss_weight: float = 0.0, batch_priority: bool = False):
        super().__init__(dim, num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is not allowed: it must be <= num_experts={num_experts}.")
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func={score_func!r} is not allowed: use 'sigmoid' or 'softmax'.")
        check_positive_int("n_group", n_group)
        if num_experts % n_group:
            raise ValueError(f"n_group={n_group} is not allowed: it must divide num_experts={num_experts}.")
        check_positive_int("topk_group", topk_group)
        if topk_group > n_group and n_group == 1:
            raise ValueError(f"topk_group={topk_group} is not allowed: {type(self).__name__} with n_group=1 has no "
                             "group-limited routing, so topk_group would change nothing; set n_group > 1 (a divisor "
                             "of num_experts) or topk_group=1.")
        if topk_group > n_group:
            raise ValueError(f"topk_group={topk_group} is not allowed: it must be <= n_group={n_group}.")
        if n_group > 1 and top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k={top_k} is not allowed: only topk_group·E/n_group="
                             f"{topk_group * (num_experts // n_group)} experts are eligible.")
        check_finite("bias_update_rate", bias_update_rate, ge=0)
        check_finite("route_scale", route_scale, gt=0)
        check_finite("seq_aux_loss_weight", seq_aux_loss_weight, ge=0)
        check_bool("renormalize", renormalize)
        self.top_k, self.score_func, self.route_scale = top_k, score_func, float(route_scale)
        self.renormalize = renormalize
        self.n_group, self.topk_group = n_group, topk_group
        self.bias_update_rate = float(bias_update_rate)
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.batch_priority = check_batch_priority(batch_priority, capacity_factor, type(self).__name__)
        self.seq_aux_loss_weight = seq_aux_loss_weight
        self.weight = init_router_weight(num_experts, dim)
        # State outside autograd: the bias is saved with the model; the pending counts are not.
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("pending_load_E", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the bias and counts in float32 whatever dtype the model is cast to: ±γ steps of 1e-3
        # vanish in bf16 around values of order 1.
        bias, load = self.expert_bias_E, self.pending_load_E
        super()._apply(fn, recurse)
        if self.expert_bias_E.dtype != torch.float32:
            self.expert_bias_E = bias.to(self.expert_bias_E.device, torch.float32)
            self.pending_load_E = load.to(self.pending_load_E.device, torch.float32)
        return self

    def _group_limit(self, biased_GSE: torch.Tensor) -> torch.Tensor:
        """Mask (−inf) the experts outside each token's ``topk_group`` best expert groups."""
        G, S, E = biased_GSE.shape
        per_group = E // self.n_group
        grouped = biased_GSE.view(G, S, self.n_group, per_group)
        group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
        best = group_score.topk(self.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(-1, best, True)
        return grouped.masked_fill(~allowed[..., None], float("-inf")).view(G, S, E)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.linear_logits(x_GSD, self.weight)
        if self.score_func == "sigmoid":
            scores_GSE = torch.sigmoid(logits_GSE)
        else:
            scores_GSE = torch.softmax(logits_GSE, dim=-1)
        select_GSE = scores_GSE.detach() + self.expert_bias_E
        if self.n_group > 1:
            select_GSE = self._group_limit(select_GSE)
        top_idx_GSK = select_GSE.topk(self.top_k, dim=-1).indices
        gates_GSE = scores_GSE
        if self.renormalize:
            gates_GSE = scores_GSE / scores_GSE.gather(-1, top_idx_GSK).sum(-1, keepdim=True).clamp_min(1e-20)
        gates_GSE = gates_GSE * self.route_scale
        # router probabilities for statistics and the sequence-wise loss: scores normalised per token
        probs_GSE = scores_GSE / scores_GSE.sum(-1, keepdim=True).clamp_min(1e-20)
        routing = select_token_choice(select_GSE, gates_GSE, self.top_k, self.capacity(x_GSD.shape[1]),
                                      self.batch_priority, mask_GS, scores_GSE=probs_GSE)
        routing.extras["expert_bias_E"] = self.expert_bias_E.detach().clone()
        self.aux_losses = {}
        if self.training:
            with torch.no_grad():
                self.pending_load_E += routing.tokens_per_expert().to(torch.float32)
            if self.seq_aux_loss_weight:
                self.aux_losses["seq_balance"] = self.seq_aux_loss_weight * losses.switch_loss(
                    probs_GSE, top_idx_GSK, mask_GS)
        return routing

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """``b += γ·sign(mean(c) − c)`` with the loads c counted since the last call; resets c."""
        load_E = self.pending_load_E
        if self.bias_update_rate and bool(load_E.sum() > 0):
            self.expert_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()
