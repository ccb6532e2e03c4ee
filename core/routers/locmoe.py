"""LocMoE: routing that combines load balance with locality, and the lower bound of expert capacity
(Li, Sun, He, Zeng, Lin, Li, Zheng, Zhao, Chen, "LocMoE: A Low-Overhead MoE for Large Language
Model Training", IJCAI 2024, arXiv 2401.13920).

Locality. Under expert parallelism over R ranks, rank r hosts the contiguous block of experts
``{e : ⌊e·R/E⌋ = r}``; a token's own rank's experts are its *local* experts, and an assignment to
them never crosses the network. Here:

- with ``torch.distributed`` initialised on W > 1 ranks, R = W and every token is on this rank;
- otherwise (one process) R = ``num_ranks`` simulated ranks, and the token at position s of its
  routing group is taken to live on rank ``s mod R``. The position, not the group's index in the
  batch, so that a token's home rank (and its routing) does not change with the batch size or
  the group's place in the batch; ``local_SE`` in the routing's extras says which experts are local
  to each position.

Routing, for token s with ``p = softmax(x W + ε)`` (gate W orthogonally initialised, as the paper's
orthogonal gating weights; ε the V-MoE training noise, 0 by default):

- selection scores ``p_e + β·1[e local to s]``: the top-K of these, so a token moves to its best
  local expert whenever that expert's gate is within β of its best remote one (``local_bias`` β);
  combine weights stay the unbiased ``p_e``; buffers of ``C = ceil(S·K·cf/E)`` (None: dropless);
- locality loss ``μ · mean_s KL(u_L ‖ p_s)``, u_L uniform over the local experts: it moves gate mass
  towards local experts during training (``locality_loss_weight`` μ), next to the Switch balance
  loss that keeps the load spread (``switch_loss_weight``).

Capacity bound. Tokens and gate vectors are compared by angle: an expert must be able to hold every
token that lies within the maximal angular deviation δ of its gate vector,
``δ = max over assignments (s, e) of arccos(x_s·w_e / (‖x_s‖‖w_e‖))``. With token directions
uniform on the unit sphere of R^D, the share of tokens inside that cone is the normalised area of a
spherical cap of angular radius δ,
``A_D(δ) = ½ · I_{sin²δ}((D−1)/2, ½)`` for δ ≤ π/2 and ``1 − A_D(π−δ)`` beyond (I the regularised
incomplete beta function; A_2(δ) = δ/π, A_3(δ) = (1 − cos δ)/2), so the capacity of an expert must be
at least ``C_min = ⌈T · A_D(δ)⌉`` for T tokens (``capacity_lower_bound``). Routing extras carry δ of
each forward (``max_angle``); the bound itself is computed on the host.

Token-local and causal when dropless (the default); the local experts depend on the token's position.

Legend: G groups, S tokens per group, D width, E experts, K experts per token, R ranks, N assignments.
"""

from __future__ import annotations

import math
import os

import torch
from scipy.special import betainc
from torch import nn

from core.routers.base import check_finite, check_positive_int, select_token_choice
from core.routers.topk import TopKRouter
from core.routing import Routing

_NUM_RANKS = 2  # the default; a distributed launch takes its ranks from the processes, and other values are refused


def spherical_cap_fraction(dim: int, angle: float) -> float:
    """``A_D(δ)``: share of the unit sphere of R^D within angle δ of a fixed direction."""
    check_positive_int("dim", dim)
    delta = min(max(float(angle), 0.0), math.pi)
    if dim == 1:  # the sphere is two points
        return 0.5 if delta < math.pi else 1.0
    if delta > math.pi / 2:
        return 1.0 - spherical_cap_fraction(dim, math.pi - delta)
    return 0.5 * float(betainc((dim - 1) / 2, 0.5, math.sin(delta) ** 2))


def capacity_lower_bound(num_tokens: int, dim: int, max_angle: float) -> int:
    """``C_min = ⌈T · A_D(δ)⌉``: LocMoE's least expert capacity for T tokens of width D whose
    maximal angular deviation from their experts' gate vectors is δ (radians)."""
    return math.ceil(num_tokens * spherical_cap_fraction(dim, max_angle) - 1e-9)


def max_angular_deviation(x_TD: torch.Tensor, weight_ED: torch.Tensor, token_N: torch.Tensor,
                          expert_N: torch.Tensor) -> torch.Tensor:
    """δ, the largest angle (radians, a 0-dim tensor) between an assigned token and its expert's
    gate vector; 0 without assignments."""
    if token_N.numel() == 0:
        return x_TD.new_zeros((), dtype=torch.float32)
    with torch.no_grad():
        x_ND = nn.functional.normalize(x_TD.float()[token_N], dim=-1)
        w_ND = nn.functional.normalize(weight_ED.float()[expert_N], dim=-1)
        return torch.arccos((x_ND * w_ND).sum(-1).clamp(-1.0, 1.0)).max()


class LocMoERouter(TopKRouter):
    """Top-K token choice with a selection bias towards the token's own rank's experts and a
    locality loss.

    Args:
        dim: D.
        num_experts: E.
        top_k: K experts per token.
        capacity_factor: cf > 0, or None for dropless routing.
        num_ranks: R ranks the experts are split over when not distributed (position s on rank s mod R).
        local_bias: β added to local experts' gates for selection only (>= 0).
        locality_loss_weight: μ of the locality loss (>= 0).
        noise_std, importance_loss_weight, load_loss_weight, switch_loss_weight, z_loss_weight,
        capacity_multiple_of, batch_priority, renormalize: as ``TopKRouter``.
    """

    family = "token choice"
    routes_by_position = True  # one process: the home rank is the position's (a KV cache cannot follow it)

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, capacity_factor: float | None = None,
                 num_ranks: int = _NUM_RANKS, local_bias: float = 0.1, locality_loss_weight: float = 0.01,
                 noise_std: float = 0.0, importance_loss_weight: float = 0.0, load_loss_weight: float = 0.0,
                 switch_loss_weight: float = 0.01, z_loss_weight: float = 0.0, capacity_multiple_of: int = 1,
                 batch_priority: bool = False, renormalize: bool = False):
        super().__init__(dim, num_experts, top_k=top_k, capacity_factor=capacity_factor,
                         capacity_multiple_of=capacity_multiple_of, batch_priority=batch_priority,
                         noise_std=noise_std, renormalize=renormalize,
                         importance_loss_weight=importance_loss_weight, load_loss_weight=load_loss_weight,
                         switch_loss_weight=switch_loss_weight, z_loss_weight=z_loss_weight)
        self.num_ranks = check_positive_int("num_ranks", num_ranks)
        check_finite("local_bias", local_bias, ge=0)
        check_finite("locality_loss_weight", locality_loss_weight, ge=0)
        self.local_bias, self.locality_loss_weight = float(local_bias), float(locality_loss_weight)
        with torch.no_grad():  # orthogonal gate vectors (rows when E <= D), of unit norm like LeCun's rows
            nn.init.orthogonal_(self.weight)

    def check_options(self) -> None:
        world = os.environ.get("WORLD_SIZE", "1")
        name = type(self).__name__
        if world in ("", "1") and self.num_ranks == 1 and self.local_bias:
            raise ValueError(f"local_bias={self.local_bias} is not allowed: {name} with num_ranks=1 in one process "
                             "has every expert local, so the bias moves no choice; set num_ranks > 1 or local_bias=0.")
        if world not in ("", "1") and self.num_ranks != _NUM_RANKS:
            raise ValueError(f"num_ranks={self.num_ranks} is not allowed: {name} in a launch of WORLD_SIZE={world} "
                             "processes takes its ranks from the processes and never reads num_ranks (which "
                             f"simulates ranks in one process); leave it at {_NUM_RANKS}.")
        super().check_options()

    def local_experts(self, group_size: int, device) -> torch.Tensor:
        """S×E bool: the experts hosted on the rank of the token at each position (contiguous
        blocks ``⌊e·R/E⌋``)."""
        E = self.num_experts
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            R = torch.distributed.get_world_size()
            rank_S = torch.full((group_size,), torch.distributed.get_rank(), device=device)
        else:
            R = self.num_ranks
            rank_S = torch.arange(group_size, device=device) % R
        rank_E = torch.arange(E, device=device) * R // E
        return rank_S[:, None] == rank_E[None, :]

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        logits_GSE = self.linear_logits(x_GSD, self.weight)
        noisy_GSE = self.add_noise(logits_GSE, self.noise_std)
        gates_GSE = torch.softmax(noisy_GSE, dim=-1)
        local_SE = self.local_experts(x_GSD.shape[1], x_GSD.device)
        routing = self._select(x_GSD, gates_GSE, local_SE, mask_GS)
        self.aux_losses = {}
        if self.training:
            self.aux_losses = self._aux_losses(logits_GSE, noisy_GSE, gates_GSE, mask_GS)
            if self.locality_loss_weight:
                self.aux_losses["locality"] = self.locality_loss_weight * locality_loss(gates_GSE, local_SE, mask_GS)
        return routing

    def _select(self, x_GSD, gates_GSE, local_SE, mask_GS) -> Routing:
        select_GSE = gates_GSE.detach() + self.local_bias * local_SE
        routing = select_token_choice(select_GSE, gates_GSE, self.top_k, self.capacity(x_GSD.shape[1]),
                                      self.batch_priority, mask_GS, scores_GSE=gates_GSE,
                                      renormalize=self.renormalize)
        self._record(routing, x_GSD, local_SE)
        return routing

    def _record(self, routing: Routing, x_GSD: torch.Tensor, local_SE: torch.Tensor) -> None:
        """Extras: which experts are local to each position, and δ of this routing."""
        routing.extras["local_SE"] = local_SE
        routing.extras["max_angle"] = max_angular_deviation(
            x_GSD.reshape(-1, x_GSD.shape[-1]), self.weight, routing.token_idx_N, routing.expert_idx_N)


def local_share(routing: Routing, local_SE: torch.Tensor) -> torch.Tensor:
    """Share of the kept assignments that go to an expert local to the token's position."""
    local_N = local_SE[routing.token_idx_N % routing.group_size, routing.expert_idx_N]
    return local_N.float().mean() if local_N.numel() else torch.zeros(())


def locality_loss(probs_GSE: torch.Tensor, local_SE: torch.Tensor, mask_GS: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_s KL(u_L ‖ p_s)`` over valid tokens, u_L uniform over the token's local experts:
    ``Σ_{e∈L} (1/|L|)(log(1/|L|) − log p_e)``."""
    u_SE = local_SE.float() / local_SE.sum(-1, keepdim=True).float().clamp_min(1.0)
    log_p_GSE = torch.log(probs_GSE.float().clamp_min(1e-20))
    kl_GS = (u_SE * (torch.log(u_SE.clamp_min(1e-20)) - log_p_GSE)).sum(-1)
    m_GS = torch.ones_like(kl_GS) if mask_GS is None else mask_GS.float()
    return (kl_GS * m_GS).sum() / m_GS.sum().clamp_min(1.0)
