"""The router base class and the two selection rules every sparse router shares.

Selection rules follow google-research/vmoe (Riquelme et al., "Scaling Vision with Sparse Mixture of
Experts", NeurIPS 2021; Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022):
token choice takes the top-K experts per token and fills each expert's buffer in K-major order
(optionally Batch Prioritized); expert choice lets every expert take its top-C tokens.

Legend: G groups, S tokens per group, D model width, E experts, K experts per token, C capacity,
N assignments.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.routing import (
    Routing, check_float_input, check_token_ids, check_token_mask, positions_in_segment,
)
from core.checks import ConfigError, NotApplicableError, check_int, check_number


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``, else a ``ConfigError`` naming it."""
    check_int(name, value, minimum)
    return value


def check_finite(name: str, value, *, gt: float | None = None, ge: float | None = None):
    """``value`` if it is a finite number ``> gt`` / ``>= ge``, else a ``ConfigError`` naming it (inf
    and NaN are refused: a noise scale, temperature, rate or loss weight that is not finite turns the
    first forward or step into NaNs)."""
    check_number(name, value, gt=gt, ge=ge)
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (a string such as ``'no'`` would silently count as true)."""
    if not isinstance(value, bool):
        raise ConfigError(name, value, "use true or false")
    return value


def check_capacity_factor(value) -> float | None:
    """A finite number > 0, or None (dropless): an infinite capacity factor would size the expert
    buffers as infinite (use null for dropless routing)."""
    if value is None:
        return None
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not value > 0):
        raise ValueError(
            f"capacity_factor={value!r} is not allowed: it must be a finite number > 0, "
            "or null for dropless routing."
        )
    return float(value)


def compute_capacity(num_tokens: int, num_experts: int, capacity_factor: float, multiple_of: int = 1) -> int:
    """``ceil(num_tokens·cf/E)``, rounded up to a multiple of ``multiple_of`` (vmoe uses 4)."""
    capacity = math.ceil(num_tokens * capacity_factor / num_experts)
    return max(multiple_of, int(math.ceil(capacity / multiple_of) * multiple_of))


class TokenChoiceCapacity:
    """Capacity and causality of a token-choice router whose expert buffers hold
    ``C = ceil(S·k·cf / E)`` assignments each (``compute_capacity``), k the experts per token.

    Causal iff dropless (``capacity_factor=None``) or one expert per token without Batch Prioritized
    Routing: buffers fill choice-major (every token's first choice before any second choice), so with
    k > 1 a later token's first choice can push out an earlier token's second choice, and BPR
    reorders the whole group by gate value. Mix it in before ``Router``; a router overrides
    ``experts_per_token`` or ``capacity_experts`` where they differ from ``top_k`` and
    ``num_experts`` (hierarchical routing, AdaMoE's null experts).
    """

    capacity_factor: float | None
    capacity_multiple_of: int = 1
    batch_priority: bool = False

    @property
    def experts_per_token(self) -> int:
        return self.top_k

    @property
    def capacity_experts(self) -> int:
        """The experts the ``S·k`` assignments are spread over."""
        return self.num_experts

    @property
    def is_causal(self) -> bool:
        if self.capacity_factor is None:
            return True
        return self.experts_per_token == 1 and not self.batch_priority

    @property
    def eval_group_dependent(self) -> bool:
        """A capacity shared by the group's tokens makes a token's routing depend on the others."""
        return self.capacity_factor is not None or super().eval_group_dependent

    def capacity(self, group_size: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return compute_capacity(group_size * self.experts_per_token, self.capacity_experts, self.capacity_factor,
                                self.capacity_multiple_of)

    def check_options(self) -> None:
        if self.capacity_factor is None and self.capacity_multiple_of != 1:
            raise ValueError(f"capacity_multiple_of={self.capacity_multiple_of} is not allowed: {type(self).__name__} "
                             "with capacity_factor=None is dropless and has no capacity to round; set capacity_factor "
                             "(e.g. 1.0) or capacity_multiple_of=1.")
        super().check_options()


class Router(nn.Module):
    """Base class of every router: ``forward(x_GSD, mask_GS=None) -> Routing``.

    Subclasses own their parameters and set ``self.aux_losses`` (named, already weighted scalars) on
    every training forward. What a router needs from the model around it is declared on its class,
    and callers (the domains, the config checks, expert parallelism) read these facts instead of
    testing for particular routers:

    - ``token_local``: a token's routing depends only on that token (``is_causal`` follows from it,
      and a router may refine ``is_causal``), so the router is safe in a causal language model;
    - ``needs_token_ids``: it routes by the token's id (hash routing), so the model must pass
      ``token_ids``; images, examples and CLIP's text blocks have none;
    - ``supports_expert_parallel``: its experts can live on different ranks (False when every token
      meets every expert: Soft MoE slots, merged experts);
    - ``mixes_tokens``: an expert's input mixes several tokens of the group (Soft MoE, merging), so a
      token's output depends on the others in its group even in evaluation;
    - ``routes_by_position``: a token's routing depends on its position in its group, not only on
      the token (so a KV-cached decoder, which routes each new token in a group of its own, cannot
      reproduce it: ``nlp.models.incremental_routing_problem``);
    - ``eval_group_dependent`` (a property): in evaluation, a token's routing or output depends on the
      other tokens of its group (a choice over the group, capacity, mixing); False: a token's output is
      the same in any group, so evaluation needs no fixed routing groups (BASE routes greedily there);
    - ``routes_segments``: its groups are consecutive segments of one sequence, each routed by the one
      before (Lory), so it needs a domain whose examples are sequences (``routing_group_size``); where
      a group is a whole example (an image, a caption) an example would be routed by its batch
      neighbour, and the router is not applicable;
    - ``check_group_size(S)``: the routing group sizes it accepts (BASE: a multiple of E);
    - ``routing_group_size(seq_len)``: the group size it needs inside a sequence (Lory: a segment),
      or None for the caller's choice.

    Inputs (checked for every router before ``forward`` runs; O(1) shape and dtype checks, no host
    sync): ``x_GSD`` a floating-point G×S×D tensor with G >= 1 groups of S >= 1 tokens and D = ``dim``
    (an empty group is a ``ValueError``: the ``MoE`` layer answers an empty batch without calling its
    router); ``mask_GS`` None or G×S, bool or 0/1 integer (read as ``mask != 0``; float masks are
    refused); ``token_ids_GS``, where given, G×S integers. A group whose tokens are all masked is
    routed to no expert (soft routings dispatch nothing, merged routings still return weights) and
    its auxiliary losses are 0. Non-finite values in ``x_GSD`` are not checked (that would need a host
    sync): they propagate into the routing's weights, scores and losses as NaN, and no router raises
    on them (a NaN token may be routed anywhere or dropped).

    Args:
        dim: D, the width of the tokens routed.
        num_experts: E.
    """

    token_local: bool = True
    needs_token_ids: bool = False
    supports_expert_parallel: bool = True
    mixes_tokens: bool = False
    routes_by_position: bool = False
    routes_segments: bool = False

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.aux_losses: dict[str, torch.Tensor] = {}

    @property
    def is_causal(self) -> bool:
        """Whether routing token s never looks at tokens after s in its group."""
        return self.token_local

    @property
    def eval_group_dependent(self) -> bool:
        """Whether, in evaluation, a token's routing or output depends on the other tokens of its group."""
        return not self.token_local or self.mixes_tokens or self.routes_by_position

    def check_group_size(self, group_size: int) -> None:
        """Raise ``ValueError`` when this router cannot route groups of ``group_size`` tokens."""

    def routing_group_size(self, seq_len: int) -> int | None:
        """The routing group size this router needs in sequences of ``seq_len`` tokens (None: any)."""
        return None

    def check_options(self) -> None:
        """Raise ``ValueError`` (``name=value is not allowed: ...``) for an option whose value cannot act
        with the router's other options, so that no option is silently ignored (e.g.
        ``capacity_multiple_of`` without a capacity). ``core.validate.check_router`` calls it on every
        router config; the constructor does not, because code that builds a router directly leaves
        such defaults in place (``TopKRouter(noise_std=0.0)`` keeps an unused ``load_loss_weight``)."""

    def __call__(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        mask_GS = self.check_input(x_GSD, mask_GS, kwargs.get("token_ids_GS"))
        return super().__call__(x_GSD, mask_GS, **kwargs)

    def check_input(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None,
                    token_ids_GS: torch.Tensor | None = None) -> torch.Tensor | None:
        """The input contract above (O(1)); returns ``mask_GS`` as a bool tensor (or None)."""
        check_float_input("x_GSD", x_GSD, f"(G, S, dim={self.dim})")
        if x_GSD.dim() != 3 or x_GSD.shape[-1] != self.dim:
            raise ValueError(f"x_GSD has shape {tuple(x_GSD.shape)}; a router routes (G, S, dim={self.dim}) groups "
                             "(the MoE layer reshapes any (..., dim) input into them).")
        G, S, _ = x_GSD.shape
        if G == 0 or S == 0:
            raise ValueError(f"x_GSD has shape {tuple(x_GSD.shape)}; a router needs at least one group of at least one "
                             "token (the MoE layer returns an empty output for an empty batch without routing).")
        of = "the groups and tokens of x_GSD"
        check_token_ids("token_ids_GS", token_ids_GS, (G, S), of)
        return check_token_mask("mask_GS", mask_GS, (G, S), of)

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        raise NotImplementedError

    def linear_logits(self, x_GSD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32, whatever autocast says: routing decisions are precision-sensitive."""
        with torch.autocast(device_type=x_GSD.device.type, enabled=False):
            return torch.nn.functional.linear(x_GSD.float(), weight_ED.float())

    def add_noise(self, logits_GSE: torch.Tensor, noise_std: float) -> torch.Tensor:
        """V-MoE noise ``ε ~ N(0, (noise_std/E)²)`` during training only."""
        if not (self.training and noise_std > 0):
            return logits_GSE
        return logits_GSE + torch.randn_like(logits_GSE) * (noise_std / self.num_experts)


def init_router_weight(num_experts: int, dim: int) -> nn.Parameter:
    """E×D gate weight, LeCun-normal like vmoe's ``nn.Dense`` (refused, naming ``num_experts``, when it
    would not fit in memory)."""
    from core.memory import check_allocation

    check_allocation(4.0 * num_experts * dim, f"a {num_experts:,}x{dim} router weight", "num_experts", num_experts)
    return nn.Parameter(torch.randn(num_experts, dim) / math.sqrt(dim))


def select_token_choice(
    select_GSE: torch.Tensor,
    gates_GSE: torch.Tensor,
    k: int,
    capacity: int | None,
    batch_priority: bool = False,
    mask_GS: torch.Tensor | None = None,
    scores_GSE: torch.Tensor | None = None,
    eligible_GSE: torch.Tensor | None = None,
    renormalize: bool = False,
) -> Routing:
    """Top-K experts per token by ``select_GSE``; combine gate read from ``gates_GSE``, divided by
    the sum of the token's K chosen gates when ``renormalize`` (before capacity drops, so a dropped
    choice does not raise the weight of the kept one).

    Buffer slots are claimed K-major (every token's 1st choice before any 2nd choice) in token
    order, or in descending top-1 score order with Batch Prioritized Routing; choices past
    ``capacity`` are dropped. Masked tokens make no choices; choices outside ``eligible_GSE`` (e.g.
    zeros of a sparse plan) are dropped without taking a slot.
    """
    G, S, E = select_GSE.shape
    dev = select_GSE.device
    top_val_GSK, top_idx_GSK = torch.topk(select_GSE, k, dim=-1)
    if batch_priority:
        order_GS = torch.argsort(-top_val_GSK[..., 0], dim=1, stable=True)
    else:
        order_GS = torch.arange(S, device=dev).expand(G, S)
    # Assignments listed (group, k, token-in-priority-order): the order in which they claim slots.
    expert_GKS = top_idx_GSK.gather(1, order_GS[..., None].expand(G, S, k)).transpose(1, 2)
    token_GS = order_GS + torch.arange(G, device=dev)[:, None] * S
    token_GKS = token_GS[:, None, :].expand(G, k, S)
    token_N = token_GKS.reshape(-1)
    expert_N = expert_GKS.reshape(-1)
    weight_N = gates_GSE.reshape(G * S, E)[token_N, expert_N]
    if renormalize:
        chosen_sum_T = gates_GSE.gather(-1, top_idx_GSK).sum(-1).reshape(-1)
        weight_N = weight_N / chosen_sum_T[token_N]

    keep_N = None
    num_choices: int | torch.Tensor = G * S * k
    if mask_GS is not None:
        keep_N = mask_GS.reshape(-1)[token_N]
    if eligible_GSE is not None:
        eligible_N = eligible_GSE.reshape(G * S, E)[token_N, expert_N]
        keep_N = eligible_N if keep_N is None else keep_N & eligible_N
    if keep_N is not None:
        num_choices = keep_N.sum()  # a tensor: no host sync
    if capacity is not None:
        group_N = torch.div(token_N, S, rounding_mode="floor")
        key_N = group_N * E + expert_N
        if keep_N is not None:  # masked tokens go to a segment of their own and take no slot
            key_N = torch.where(keep_N, key_N, G * E)
        in_capacity_N = positions_in_segment(key_N, G * E + 1) < capacity
        keep_N = in_capacity_N if keep_N is None else keep_N & in_capacity_N
    if keep_N is not None:
        token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
    return Routing(
        num_groups=G, group_size=S, num_experts=E,
        token_idx_N=token_N, expert_idx_N=expert_N, weight_N=weight_N,
        capacity=capacity, num_choices=num_choices,
        scores_GSE=gates_GSE if scores_GSE is None else scores_GSE, mask_GS=mask_GS,
    )


def select_expert_choice(
    select_GSE: torch.Tensor,
    gates_GSE: torch.Tensor,
    capacity: int,
    mask_GS: torch.Tensor | None = None,
    eligible_GSE: torch.Tensor | None = None,
    scores_GSE: torch.Tensor | None = None,
) -> Routing:
    """Every expert takes its top-C tokens by ``select_GSE`` (C clipped to S); combine gate read
    from ``gates_GSE``. Masked tokens and entries outside ``eligible_GSE`` are never picked, so an
    expert may fill fewer than C slots when fewer tokens are eligible."""
    G, S, E = select_GSE.shape
    dev = select_GSE.device
    C = min(capacity, S)
    invalid_GSE = None
    if mask_GS is not None:
        invalid_GSE = ~mask_GS[..., None].expand(G, S, E)
    if eligible_GSE is not None:
        invalid_GSE = ~eligible_GSE if invalid_GSE is None else invalid_GSE | ~eligible_GSE
    if invalid_GSE is not None:
        select_GSE = select_GSE.masked_fill(invalid_GSE, float("-inf"))
    top_val_GEC, top_tok_GEC = torch.topk(select_GSE.transpose(1, 2), C, dim=-1)
    token_N = (top_tok_GEC + torch.arange(G, device=dev)[:, None, None] * S).reshape(-1)
    expert_N = torch.arange(E, device=dev)[None, :, None].expand(G, E, C).reshape(-1)
    weight_N = gates_GSE.reshape(G * S, E)[token_N, expert_N]
    num_choices: int | torch.Tensor = G * E * C
    if mask_GS is not None:  # an expert cannot choose padding: slots beyond the valid tokens are not drops
        num_choices = (mask_GS.sum(1).clamp(max=C) * E).sum()
    if invalid_GSE is not None:
        keep_N = top_val_GEC.reshape(-1) > float("-inf")
        token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
    return Routing(
        num_groups=G, group_size=S, num_experts=E,
        token_idx_N=token_N, expert_idx_N=expert_N, weight_N=weight_N,
        capacity=C, num_choices=num_choices,
        scores_GSE=gates_GSE if scores_GSE is None else scores_GSE, mask_GS=mask_GS,
    )


def check_applicable(router: Router | type[Router], *, token_ids: bool, where: str, key: str = "router",
                     sequences: bool = False) -> None:
    """Refuse a router whose needs the model cannot meet: ``NotApplicableError`` naming the router when
    it routes by token id and ``where`` (e.g. "image patches") has no token ids to give it, or when it
    routes segments of a sequence (``routes_segments``) and the model's groups are whole examples
    (``sequences=False``)."""
    cls = router if isinstance(router, type) else type(router)
    if cls.routes_segments and not sequences:
        raise NotApplicableError(key, cls.__name__, f"{cls.__name__} routes each segment of a sequence by the segment "
                                 f"before it, and {where} are not sequences cut into segments (an example would be "
                                 "routed by its neighbour in the batch); use it in nlp, or pick another router")
    if cls.needs_token_ids and not token_ids:
        raise NotApplicableError(key, cls.__name__, f"{cls.__name__} needs token ids (it routes by token id), "
                                 f"and {where} have none; use a learned router (e.g. +router=topk)")
