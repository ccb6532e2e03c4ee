"""Sentence-level (sequence-level) gating (Kudugunta et al., "Beyond Distillation: Task-level
Mixture-of-Experts for Efficient Inference", Findings of EMNLP 2021): every token of a routing group
(a sentence or sequence) goes to the same top-K experts, chosen by ``softmax(W·mean_s x_s)`` over the
group's valid tokens; the combine gate is the selected probability (or the top-K renormalised).
Balance: the Switch loss computed over the sequences of the batch. Not causal: the mean covers the
whole sequence, so a token's experts depend on later tokens.

Legend: G groups (sequences), S tokens per group, D width, E experts, K experts per sequence.
"""

from __future__ import annotations

import torch

from core import losses
from core.routers.base import (
    Router, check_bool, check_finite, check_positive_int, init_router_weight, select_token_choice,
)
from core.routing import Routing


def masked_group_mean(x_GSD: torch.Tensor, mask_GS: torch.Tensor | None) -> torch.Tensor:
    """Mean over each group's valid tokens (zeros for a group without any): G×D."""
    if mask_GS is None:
        return x_GSD.mean(1)
    m_GS1 = mask_GS[..., None].to(x_GSD.dtype)
    return (x_GSD * m_GS1).sum(1) / m_GS1.sum(1).clamp_min(1.0)


class SentenceRouter(Router):
    """Route each group by the mean of its tokens.

    Args:
        dim: D.
        num_experts: E.
        top_k: K experts per sequence.
        renormalize: gates = softmax over the K selected logits (else the selected probabilities).
        switch_loss_weight: weight of the Switch loss over sequences (1e-2).
    """

    family = "token choice"
    token_local = False

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, renormalize: bool = False,
                 switch_loss_weight: float = 1e-2):
        super().__init__(dim, num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is not allowed: it must be <= num_experts={num_experts}.")
        self.top_k, self.renormalize = top_k, check_bool("renormalize", renormalize)
        self.switch_loss_weight = check_finite("switch_loss_weight", switch_loss_weight, ge=0)
        self.weight = init_router_weight(num_experts, dim)

    def group_key(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None) -> torch.Tensor:
        """The vector a group is routed by, G×D: the mean of its valid tokens (a subclass may route
        by another key, e.g. a knowledge anchor for model editing)."""
        return masked_group_mean(x_GSD.float(), mask_GS)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        E = self.num_experts
        logits_GE = self.linear_logits(self.group_key(x_GSD, mask_GS), self.weight)
        probs_GE = torch.softmax(logits_GE, dim=-1)
        top_GK = probs_GE.topk(self.top_k, dim=-1)
        gates_GE = probs_GE
        if self.renormalize:
            gates_GE = torch.zeros_like(probs_GE).scatter(-1, top_GK.indices,
                                                          top_GK.values / top_GK.values.sum(-1, keepdim=True))
        routing = select_token_choice(probs_GE[:, None].expand(G, S, E), gates_GE[:, None].expand(G, S, E),
                                      self.top_k, None, False, mask_GS,
                                      scores_GSE=probs_GE[:, None].expand(G, S, E))
        self.aux_losses = {}
        if self.training and self.switch_loss_weight:
            # sequences are the balanced units: one "group" of G sequences; empty sequences do not count
            seq_mask_1G = None if mask_GS is None else mask_GS.any(1)[None]
            self.aux_losses["switch"] = self.switch_loss_weight * losses.switch_loss(
                probs_GE[None], top_GK.indices[None], seq_mask_1G)
        return routing
