"""DSelect-k: continuously differentiable sparse gating (Hazimeh, Zhao, Chowdhery, Sathiamoorthy,
Chen, Mazumder, Hong, Chi, "DSelect-k: Differentiable Selection in the Mixture of Experts with
Applications to Multi-Task Learning", NeurIPS 2021), example-conditioned form.

k single-expert selectors, each with m = ⌈log2 E⌉ logits ``z^{(i)} = W_i x + c_i``, pass the logits
through the cubic smooth step
``S(t) = 0 (t ≤ −γ/2), 1 (t ≥ γ/2), −2t³/γ³ + 3t/(2γ) + 1/2 otherwise``
and read a binary code: ``r^{(i)}_e = Π_j S(z^{(i)}_j) if bit j of e is 1 else 1 − S(z^{(i)}_j)``.
The gate is ``a_e = Σ_i softmax(w)_i r^{(i)}_e`` with ``w = V x + v``. Once the logits leave
(−γ/2, γ/2) every selector is one-hot, so at most k experts have a nonzero gate; before that the
gate is dense. The routing lists exactly the experts with a nonzero gate (no capacity, no drops).

Regularisers: the entropy ``−Σ_e r log r`` of the selectors (weight ``entropy_weight``, pushes them
to converge) and, when E is not a power of 2, ``1/Σ_{e<E} r^{(i)}_e`` (weight
``invalid_code_weight``, keeps selectors off the codes ≥ E that have no expert); both averaged over
tokens and summed over selectors.

Legend: G groups, S tokens per group, D width, E experts, k selectors (K), M = ⌈log2 E⌉ bits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.routers.base import Router, check_finite, check_positive_int, select_token_choice
from core.routing import Routing

_INVALID_CODE_WEIGHT = 1e-2  # the default; a power-of-2 E leaves it unused, and only other values are refused


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The cubic smooth step of DSelect-k: 0 below −γ/2, 1 above γ/2, C¹ in between."""
    cubic = -2.0 * t**3 / gamma**3 + 1.5 * t / gamma + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectKRouter(Router):
    """DSelect-k gate, per token.

    Args:
        dim: D.
        num_experts: E (>= 2).
        top_k: k selectors (at most k experts once converged).
        gamma: width γ of the smooth step's transition (1.0).
        entropy_weight: weight of the selector-entropy regulariser (0 = off).
        invalid_code_weight: weight of the penalty on codes without an expert (E not a power of 2).
    """

    family = "token choice"

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, gamma: float = 1.0,
                 entropy_weight: float = 0.0, invalid_code_weight: float = _INVALID_CODE_WEIGHT):
        super().__init__(dim, num_experts)
        check_positive_int("num_experts", num_experts, minimum=2)
        self.top_k = check_positive_int("top_k", top_k)
        check_finite("gamma", gamma, gt=0)
        check_finite("entropy_weight", entropy_weight, ge=0)
        check_finite("invalid_code_weight", invalid_code_weight, ge=0)
        self.gamma = float(gamma)
        self.entropy_weight = entropy_weight
        self.invalid_code_weight = invalid_code_weight
        self.num_bits = math.ceil(math.log2(num_experts))
        K, M = top_k, self.num_bits
        # the paper's init: U(−γ/100, γ/100), so every selector starts near S = 1/2 (uniform codes)
        self.code_weight = nn.Parameter(torch.empty(K * M, dim).uniform_(-gamma / 100, gamma / 100))
        self.code_bias = nn.Parameter(torch.zeros(K * M))
        self.selector_weight = nn.Parameter(torch.empty(K, dim).uniform_(-gamma / 100, gamma / 100))
        self.selector_bias = nn.Parameter(torch.zeros(K))
        bits_EM = (torch.arange(num_experts)[:, None] >> torch.arange(M)[None, :]) & 1
        self.register_buffer("bits_EM", bits_EM.to(torch.float32), persistent=False)

    def check_options(self) -> None:
        default = _INVALID_CODE_WEIGHT
        if self.num_experts == 2**self.num_bits and self.invalid_code_weight not in (0, default):
            raise ValueError(f"invalid_code_weight={self.invalid_code_weight} is not allowed: {type(self).__name__} "
                             f"with num_experts={self.num_experts} (a power of 2) has no code without an expert, so "
                             f"the penalty never acts; leave it at {default} (or 0) or use a num_experts that is not "
                             "a power of 2.")
        super().check_options()

    def selector_outputs(self, x_GSD: torch.Tensor) -> torch.Tensor:
        """``r^{(i)}_e`` for every token: G×S×k×E."""
        G, S, _ = x_GSD.shape
        with torch.autocast(device_type=x_GSD.device.type, enabled=False):
            z = nn.functional.linear(x_GSD.float(), self.code_weight.float(), self.code_bias.float())
        s_GSKM1 = smooth_step(z.view(G, S, self.top_k, 1, self.num_bits), self.gamma)
        bits = self.bits_EM
        return (bits * s_GSKM1 + (1 - bits) * (1 - s_GSKM1)).prod(-1)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        E = self.num_experts
        r_GSKE = self.selector_outputs(x_GSD)
        with torch.autocast(device_type=x_GSD.device.type, enabled=False):
            w_GSK = torch.softmax(nn.functional.linear(x_GSD.float(), self.selector_weight.float(),
                                                       self.selector_bias.float()), dim=-1)
        gates_GSE = (w_GSK[..., None] * r_GSKE).sum(-2)
        active_GSE = gates_GSE.detach() > 0
        # every nonzero gate is a choice: list them all (dense early in training, ≤ k once converged)
        num_active = int(active_GSE.sum(-1).max()) if active_GSE.numel() else 0
        routing = select_token_choice(gates_GSE.detach(), gates_GSE, max(1, min(num_active, E)), None, False,
                                      mask_GS, scores_GSE=gates_GSE / gates_GSE.sum(-1, keepdim=True).clamp_min(1e-20),
                                      eligible_GSE=active_GSE)
        self.aux_losses = {}
        if self.training:
            m_GS = torch.ones(G, S, device=x_GSD.device) if mask_GS is None else mask_GS.float()
            n = m_GS.sum().clamp_min(1.0)
            if self.entropy_weight:
                ent_GS = -(r_GSKE * torch.log(r_GSKE + 1e-6)).sum((-1, -2))
                self.aux_losses["selector_entropy"] = self.entropy_weight * (ent_GS * m_GS).sum() / n
            if self.invalid_code_weight and E != 2**self.num_bits:
                inv_GS = (1.0 / r_GSKE.sum(-1).clamp_min(1e-6)).sum(-1)
                self.aux_losses["invalid_code"] = self.invalid_code_weight * (inv_GS * m_GS).sum() / n
        return routing
