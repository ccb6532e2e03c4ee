"""Soft MoE (Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft Mixtures of Experts",
ICLR 2024): every expert has P slots with parameters φ; logits
``L[s,e,p] = scale·⟨l2n(x_s), l2n(φ_{e,p})⟩``; a slot's input is the softmax-over-tokens mix of the
(un-normalised) tokens, a token's output the softmax-over-slots mix of the slot outputs. No token is
dropped and there is no auxiliary loss. Not token-local: every slot mixes the whole group.

The regime matters more than the formula. With the reference's normalisation and its learned scale
starting at 1, every logit lies in [-1, 1]: with S tokens per group the dispatch weights stay close to
1/S, so each slot starts as (nearly) the group's mean token, and on a short run the scale barely moves
(the router study's 156-step vision runs: scale 0.99-1.0, each slot averaging ~48 of 49 patches). Two
options leave that regime: ``scale_init`` (e.g. 10: sharp slots from the first step, normalisation kept
for stable logits at scale; the paper's long runs learn a scale in this range) and ``normalize=false``
(the paper's Algorithm 1, plain ``⟨x_s, φ_{e,p}⟩``, whose logits grow with the token norms). The
defaults (normalised, scale 1) are the reference's and right for long training at large widths, where the
scale has time to grow; on short budgets or small models, set ``scale_init`` (or turn normalisation
off) and say so in the comparison.

Legend: G groups, S tokens per group, D width, E experts, P slots per expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.routers.base import Router, check_bool, check_finite, check_positive_int
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
        normalize: l2-normalise tokens and slot parameters before the dot product (the reference
            implementation); false: the paper's Algorithm 1, plain dot products.
        scale_init: the learned logit scale's initial value (1 in the reference).
    """

    token_local = False
    supports_expert_parallel = False
    mixes_tokens = True

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, noise_std: float = 0.0,
                 normalize: bool = True, scale_init: float = 1.0):
        super().__init__(dim, num_experts)
        self.normalize = check_bool("normalize", normalize)
        check_finite("scale_init", scale_init, gt=0)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        self.noise_std = check_finite("noise_std", noise_std, ge=0)
        self.phi_DEP = nn.Parameter(torch.randn(dim, num_experts, slots_per_expert) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.full((), float(scale_init)))

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        with torch.autocast(device_type=x_GSD.device.type, enabled=False):
            x, phi = x_GSD.float(), self.phi_DEP.float()
            if self.normalize:
                x, phi = _l2_normalize(x, -1), _l2_normalize(phi, 0)
            logits_GSEP = torch.einsum("gsd,dep->gsep", x, phi) * self.scale
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
