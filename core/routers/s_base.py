"""S-BASE: BASE layers' balanced assignment approximated by Sinkhorn (Clark, de Las Casas, Guy,
Mensch et al., "Unified Scaling Laws for Routed Language Models", ICML 2022, §2 and App. A).

Training, per routing group of S tokens (S_v of them valid):

- logits ``z = x W``; the entropic transport plan ``P = diag(a) exp(z) diag(b)`` with token rows
  summing to 1 and expert columns to ``S_v/E`` (``core.transport.sinkhorn_plan``, ``num_iters``
  log-domain iterations; the columns' remaining error is the Sinkhorn tolerance, checked by the
  suite's plan invariants);
- the plan is rounded to a hard assignment in which every expert receives ``⌊S_v/E⌋`` or
  ``⌈S_v/E⌉`` tokens (exactly ``S_v/E`` when E divides S_v): each unassigned token proposes to the
  expert of highest plan mass that still has room, and every expert accepts its proposers of
  highest plan mass up to its room; at most E rounds. With ``balanced=False`` the assignment is the
  plan's top-1 (Clark et al.'s rule), which balances only as well as the plan's argmax does;
- combine gate ``σ(z_{s,a(s)})`` (the top-1 sigmoid gate of the reference implementation). No
  auxiliary loss: the plan does the balancing.

Evaluation: each token takes ``argmax_e z`` (greedy top-1, as BASE), gate ``σ(z)``; nothing is
forced to balance, and routing is token-local. In training the assignment depends on the whole
group (not causal).

Legend: G groups, S tokens per group, D width, E experts, T = G·S tokens.
"""

from __future__ import annotations

import torch

from core.routers.base import Router, check_bool, check_positive_int, init_router_weight
from core.routers.base_layer import sigmoid_top1
from core.routing import Routing, positions_in_segment
from core.transport import sinkhorn_plan


@torch.no_grad()
def round_plan_balanced(plan_GSE: torch.Tensor, mask_GS: torch.Tensor | None = None) -> torch.Tensor:
    """Expert of every token (−1 for masked ones) such that each expert of group g receives
    ``⌊S_v/E⌋`` or ``⌈S_v/E⌉`` of its S_v valid tokens (the ``S_v mod E`` larger shares go to the
    experts most tokens prefer) and all valid tokens are assigned, preferring high plan mass:
    rounds of proposals (every unassigned token to its best expert with room) and acceptances (every
    expert keeps its best proposers up to its room). A round either assigns every proposer
    or fills an expert, so E rounds suffice."""
    G, S, E = plan_GSE.shape
    dev = plan_GSE.device
    valid_GS = torch.ones(G, S, dtype=torch.bool, device=dev) if mask_GS is None else mask_GS
    # ⌊S_v/E⌋ slots each, and one more for the S_v mod E experts most tokens prefer
    n_valid_G = valid_GS.sum(1)
    prefer_GE = torch.zeros(G, E, device=dev).scatter_add_(1, plan_GSE.argmax(-1), valid_GS.float())
    extra_GE = prefer_GE.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1) < (n_valid_G % E)[:, None]
    room_GE = (n_valid_G // E)[:, None] + extra_GE.long()
    expert_GS = torch.full((G, S), -1, dtype=torch.long, device=dev)
    group_GS = torch.arange(G, device=dev)[:, None].expand(G, S)
    for _ in range(E):
        waiting_GS = valid_GS & (expert_GS < 0)
        open_GSE = (room_GE > 0)[:, None, :].expand(G, S, E)
        value_GS, choice_GS = plan_GSE.masked_fill(~open_GSE, -1.0).max(-1)
        # proposals listed best first, so a segment position is the rank among the expert's proposers
        order_N = torch.argsort(value_GS.reshape(-1), descending=True, stable=True)
        key_N = torch.where(waiting_GS.reshape(-1), (group_GS * E + choice_GS).reshape(-1), G * E)[order_N]
        rank_N = positions_in_segment(key_N, G * E + 1)
        accept_N = (key_N < G * E) & (rank_N < torch.cat([room_GE.reshape(-1), room_GE.new_zeros(1)])[key_N])
        accepted_T = torch.zeros(G * S, dtype=torch.bool, device=dev)
        accepted_T[order_N] = accept_N
        accepted_GS = accepted_T.view(G, S)
        expert_GS = torch.where(accepted_GS, choice_GS, expert_GS)
        room_GE = room_GE - torch.zeros_like(room_GE).reshape(-1).index_add_(
            0, (group_GS * E + choice_GS)[accepted_GS], torch.ones_like(choice_GS[accepted_GS])).view(G, E)
    return expert_GS


class SBaseRouter(Router):
    """Sinkhorn-balanced top-1 assignment in training, greedy top-1 at evaluation, sigmoid gate.

    Args:
        dim: D.
        num_experts: E.
        num_iters: Sinkhorn iterations (20, as the router study's Sinkhorn routers).
        balanced: round the plan to an exactly balanced assignment (True) or take its top-1.
    """

    family = "assignment"
    token_local = False
    eval_group_dependent = False  # evaluation sends each token to its best expert, whatever its group

    def __init__(self, dim: int, num_experts: int, num_iters: int = 20, balanced: bool = True):
        super().__init__(dim, num_experts)
        self.num_iters = check_positive_int("num_iters", num_iters)
        self.balanced = check_bool("balanced", balanced)
        self.weight = init_router_weight(num_experts, dim)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        G, S, _ = x_GSD.shape
        E = self.num_experts
        logits_GSE = self.linear_logits(x_GSD, self.weight)
        plan_GSE = None
        if self.training:
            plan_GSE = sinkhorn_plan(logits_GSE, mask_GS, self.num_iters)
            expert_GS = round_plan_balanced(plan_GSE, mask_GS) if self.balanced else plan_GSE.argmax(-1)
        else:
            expert_GS = logits_GSE.argmax(-1)
        if mask_GS is not None:
            expert_GS = expert_GS.masked_fill(~mask_GS, -1)
        token_N, expert_N, gate_N = sigmoid_top1(expert_GS, logits_GSE)
        routing = Routing(
            num_groups=G, group_size=S, num_experts=E, token_idx_N=token_N, expert_idx_N=expert_N,
            weight_N=gate_N, capacity=-(-S // E) if self.training and self.balanced else None,
            num_choices=token_N.numel(), scores_GSE=torch.softmax(logits_GSE, dim=-1), mask_GS=mask_GS,
        )
        if plan_GSE is not None:
            routing.extras["plan_GSE"] = plan_GSE
        self.aux_losses = {}
        return routing
