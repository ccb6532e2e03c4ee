"""BASE layers: routing as a balanced linear assignment (Lewis, Bhosale, Dettmers, Goyal,
Zettlemoyer, "BASE Layers: Simplifying Training of Large, Sparse Models", ICML 2021).

In training, the tokens of a group are assigned to experts by maximising the total affinity
``Σ_s x_s·w_{a(s)}`` subject to every expert receiving exactly S/E tokens (solved exactly with
``scipy.optimize.linear_sum_assignment`` on the affinity matrix with each expert's column repeated
S/E times; the paper uses an auction algorithm; worst case O(S³), about a second at S = 4096 on a
CPU). At evaluation each token takes its best expert (greedy top-1), so load is no longer forced.
The output mixes the expert with the input,
``y = σ(x·w_a)·f_a(x) + (1 − σ(x·w_a))·x``: the combine gate is ``σ(x·w_a)`` and
``Routing.residual_T`` is ``1 − σ(x·w_a)``. No auxiliary loss.

With a mask, only valid tokens are assigned and each expert takes at most ``ceil(valid/E)`` of them.
Non-finite affinities (NaN or infinite inputs) count as 0 in the assignment (scipy refuses them; the
check runs on the host copy the assignment needs anyway), and the token's output stays non-finite.
Not token-local in training: a token's expert depends on the whole group.

Legend: G groups, S tokens per group, D width, E experts, T = G·S tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from core.routers.base import Router
from core.routing import Routing


def balanced_assignment(affinity_SE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Expert of each of S tokens maximising the total affinity with at most ``capacity`` tokens per
    expert (exactly S/E each when ``capacity·E == S``). Exact, via a rectangular linear assignment."""
    S, E = affinity_SE.shape
    if capacity * E < S:
        raise ValueError(f"capacity={capacity} is not allowed: {E} experts cannot take {S} tokens.")
    affinity = affinity_SE.detach().double().cpu().numpy()  # the host copy syncs anyway: check it here
    finite = np.isfinite(affinity)
    if not finite.all():  # NaN/inf inputs: scipy refuses them; such a token's output is non-finite anyway
        affinity = np.where(finite, affinity, 0.0)
    cost = -np.repeat(affinity, capacity, axis=1)
    rows, cols = linear_sum_assignment(cost)
    expert_S = np.empty(S, dtype=np.int64)
    expert_S[rows] = cols // capacity
    return torch.from_numpy(expert_S).to(affinity_SE.device)


def sigmoid_top1(expert_GS: torch.Tensor, logits_GSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The assignments of a one-expert-per-token routing (``expert_GS`` −1 where a token has none)
    as ``(token_N, expert_N, gate_N)`` with the gate ``σ(z_{s,a(s)})`` of BASE and S-BASE."""
    E = logits_GSE.shape[-1]
    expert_T = expert_GS.reshape(-1)
    token_N = torch.nonzero(expert_T >= 0).squeeze(1)
    expert_N = expert_T[token_N]
    return token_N, expert_N, torch.sigmoid(logits_GSE.reshape(-1, E)[token_N, expert_N])


class BaseLayerRouter(Router):
    """Balanced assignment in training, greedy top-1 at evaluation, sigmoid input/expert mix.

    Args:
        dim: D.
        num_experts: E; the routing group size S must be a multiple of E in training.
    """

    family = "assignment"
    token_local = False
    eval_group_dependent = False  # evaluation sends each token to its best expert, whatever its group

    def __init__(self, dim: int, num_experts: int):
        super().__init__(dim, num_experts)
        # expert centroids, orthogonal with gain 0.1 as in the reference implementation
        self.centroids_ED = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, dim), gain=0.1))

    def check_group_size(self, group_size: int) -> None:
        E = self.num_experts
        if group_size % E:
            raise ValueError(f"group_size={group_size} is not allowed: BASE layers give every expert S/E tokens "
                             f"of a group, so the group size must be a multiple of num_experts={E}; set the MoE "
                             "layer's group_size (or the sequence length) to a multiple of E.")

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        E = self.num_experts
        affinity_GSE = self.linear_logits(x_GSD, self.centroids_ED)
        if self.training:
            self.check_group_size(S)
            expert_GS = torch.full((G, S), -1, dtype=torch.long, device=x_GSD.device)
            for g in range(G):
                valid = torch.arange(S, device=x_GSD.device)
                if mask_GS is not None:
                    valid = valid[mask_GS[g]]
                if valid.numel():
                    cap = -(-valid.numel() // E)
                    expert_GS[g, valid] = balanced_assignment(affinity_GSE[g, valid], cap)
        else:
            expert_GS = affinity_GSE.argmax(-1)
            if mask_GS is not None:
                expert_GS = expert_GS.masked_fill(~mask_GS, -1)
        token_N, expert_N, gate_N = sigmoid_top1(expert_GS, affinity_GSE)
        residual_T = torch.zeros(G * S, device=x_GSD.device, dtype=gate_N.dtype).index_put(
            (token_N,), 1.0 - gate_N)
        self.aux_losses = {}
        return Routing(
            num_groups=G, group_size=S, num_experts=E, token_idx_N=token_N, expert_idx_N=expert_N,
            weight_N=gate_N, capacity=S // E if self.training else None, num_choices=token_N.numel(),
            scores_GSE=torch.softmax(affinity_GSE, dim=-1), mask_GS=mask_GS, residual_T=residual_T,
        )
