"""Lory: causal segment-level expert merging (Zhong, Xia, Chen, Lewis, "Lory: Fully Differentiable
Mixture-of-Experts for Autoregressive Language Model Pre-training", arXiv 2405.03133, 2024).

Sequences are cut into segments, and each routing group is one segment: set the MoE layer's
``group_size`` to the segment length, a divisor of the sequence length, and ``segments_per_sequence``
to sequence length / segment length, so that groups ``g`` with ``g % segments_per_sequence == 0``
start a sequence. Segment k runs one FFN whose parameters are ``Σ_e α_e θ_e`` with
``α = softmax(W·mean(segment k−1))`` (the mean over the previous segment's valid tokens), so no
token's routing sees itself or a later token: causal. The first segment of a sequence has no
predecessor: ``first_segment="uniform"`` merges all experts equally (causal; the default), and
``"self"`` routes it by its own mean with the tokens detached, as the paper does (then the first
segment is not causal). No auxiliary loss.

Legend: G groups (segments), S tokens per segment, D width, E experts.
"""

from __future__ import annotations

import torch

from core.routers.base import Router, check_positive_int, init_router_weight
from core.routers.sentence import masked_group_mean
from core.routing import Routing


class LoryRouter(Router):
    """Segment k merges experts by the mean of segment k−1.

    Args:
        dim: D.
        num_experts: E.
        segments_per_sequence: segments in each sequence (the MoE layer's group_size is the segment length).
        first_segment: ``"uniform"`` (causal) or ``"self"`` (own mean, detached tokens; not causal).
    """

    family = "merging"
    routes_segments = True
    token_local = False
    supports_expert_parallel = False
    mixes_tokens = True

    def __init__(self, dim: int, num_experts: int, segments_per_sequence: int = 4, first_segment: str = "uniform"):
        super().__init__(dim, num_experts)
        self.segments_per_sequence = check_positive_int("segments_per_sequence", segments_per_sequence)
        if first_segment not in ("uniform", "self"):
            raise ValueError(f"first_segment={first_segment!r} is not allowed: use 'uniform' or 'self'.")
        self.first_segment = first_segment
        self.weight = init_router_weight(num_experts, dim)

    @property
    def is_causal(self) -> bool:
        return self.first_segment == "uniform"

    def routing_group_size(self, seq_len: int) -> int:
        """One routing group per segment: ``seq_len / segments_per_sequence`` tokens."""
        if seq_len % self.segments_per_sequence:
            raise ValueError(f"segments_per_sequence={self.segments_per_sequence} is not allowed: the segments "
                             f"must tile a sequence of {seq_len} tokens; use a divisor of {seq_len}.")
        return seq_len // self.segments_per_sequence

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        E = self.num_experts
        mean_GD = masked_group_mean(x_GSD.float(), mask_GS)
        first_G = (torch.arange(G, device=x_GSD.device) % self.segments_per_sequence) == 0
        # segment g is routed by segment g−1; segment 0 of every sequence by the rule for first segments
        prev_GD = torch.cat([mean_GD[:1], mean_GD[:-1]], dim=0)
        if self.first_segment == "self":
            prev_GD = torch.where(first_G[:, None], mean_GD.detach(), prev_GD)
        merge_GE = torch.softmax(self.linear_logits(prev_GD, self.weight), dim=-1)
        if self.first_segment == "uniform":
            merge_GE = torch.where(first_G[:, None], torch.full_like(merge_GE, 1.0 / E), merge_GE)
        self.aux_losses = {}
        return Routing(num_groups=G, group_size=S, num_experts=E, merge_GE=merge_GE,
                       scores_GSE=merge_GE[:, None].expand(G, S, E), mask_GS=mask_GS)
