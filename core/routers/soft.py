"""Soft MoE (Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft Mixtures of Experts",
ICLR 2024): every expert has P slots with parameters φ; logits
``L[s,e,p] = scale·⟨l2n(x_s), l2n(φ_{e,p})⟩``; a slot's input is the softmax-over-tokens mix of the
(un-normalised) tokens, a token's output the softmax-over-slots mix of the slot outputs. No token is
dropped and there is no auxiliary loss. Not token-local: every slot mixes the whole group.

Legend: G groups, S tokens per group, D width, E experts, P slots per expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.routers.base import Router, check_finite, check_positive_int
from core.routing import Routing


def _l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x * torch.rsqrt(x.square().sum(dim, keepdim=True) + 1e-6)


class SoftRouter(Router):
    """Soft MoE router.

    Args:
        dim: D.
        num_experts: E.
        slots_per_expert: P (the released Soft MoE configs use 1).
        noise_std: std of Gaussian noise added to the logits in training (0 in the paper).
    """

    token_local = False
    supports_expert_parallel = False
    mixes_tokens = True

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, noise_std: float = 0.0):
        super().__init__(dim, num_experts)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        self.noise_std = check_finite("noise_std", noise_std, ge=0)
        self.phi_DEP = nn.Parameter(torch.randn(dim, num_experts, slots_per_expert) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        with torch.autocast(device_type=x_GSD.device.type, enabled=False):
            logits_GSEP = torch.einsum(
                "gsd,dep->gsep", _l2_normalize(x_GSD.float(), -1), _l2_normalize(self.phi_DEP.float(), 0)
            ) * self.scale
        if self.training and self.noise_std > 0:
            logits_GSEP = logits_GSEP + self.noise_std * torch.randn_like(logits_GSEP)
        E, P = self.num_experts, self.slots_per_expert
        if mask_GS is not None:
            # padded tokens feed no slot; an all-padded group gets all-zero dispatch, not NaN
            masked = logits_GSEP.masked_fill(~mask_GS[..., None, None], float("-inf"))
            dispatch_GSEP = torch.nan_to_num(torch.softmax(masked, dim=1), nan=0.0)
        else:
            dispatch_GSEP = torch.softmax(logits_GSEP, dim=1)
        combine_GSEP = torch.softmax(logits_GSEP.reshape(G, S, E * P), dim=-1).reshape(G, S, E, P)
        if mask_GS is not None:
            combine_GSEP = combine_GSEP * mask_GS[..., None, None]
        self.aux_losses = {}
        return Routing(
            num_groups=G, group_size=S, num_experts=E, dispatch_GSEP=dispatch_GSEP,
            combine_GSEP=combine_GSEP, capacity=P, scores_GSE=combine_GSEP.sum(-1), mask_GS=mask_GS,
        )
