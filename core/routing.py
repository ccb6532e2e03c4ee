"""The `Routing` value: one description of who goes where, shared by every router and the MoE layer.

Follows the unified formulation of the router study (Liu, Blondel, Riquelme, Puigcerver, "Routers in
Vision Mixture of Experts: An Empirical Study", TMLR 2024): tokens are split into G routing groups of
S tokens; a router produces dispatch and combine weights per group. Sparse routers are stored as a
list of assignments (never as dense G×S×E×C tensors on the hot path); soft routers as dense
G×S×E×P weights.

Legend: G groups, S tokens per group, T = G·S tokens, E experts, C capacity (slots per expert),
P slots per expert (Soft MoE), N kept assignments, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def check_float_input(name: str, x, expected: str) -> None:
    """O(1) check of a token tensor: a floating-point ``torch.Tensor``, else a ``ValueError`` naming
    ``name``, its dtype and that a floating dtype is needed. ``expected`` describes the layout."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}; got a {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; a floating dtype (float32, bfloat16, float16 or float64) is "
                         f"needed: routing and the experts compute in floating point (cast it, e.g. {name}.float()).")


def check_token_mask(name: str, mask, shape: tuple[int, ...], of: str) -> torch.Tensor | None:
    """None, or ``mask`` as a bool tensor (True = real token) after O(1) shape and dtype checks.

    Accepted: bool masks, and integer masks read as ``mask != 0`` (0/1, as Hugging Face's
    ``attention_mask``; the values are not checked, which would need a host sync). Refused with a
    ``ValueError`` naming ``name``: a shape other than ``shape`` (``of`` says where it comes from), and
    float or complex masks (ambiguous: an additive attention mask uses 0 for real tokens)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(shape)} ({of}); got a {type(mask).__name__}.")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; the shape {tuple(shape)} ({of}) is needed.")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name} has dtype {mask.dtype}; a bool mask (True = real token) or a 0/1 integer mask is "
                         "needed (a float mask is ambiguous: additive attention masks use 0 for real tokens).")
    return mask != 0


def check_token_ids(name: str, ids, shape: tuple[int, ...], of: str) -> torch.Tensor | None:
    """None, or ``ids`` after O(1) checks: shape ``shape`` and an integer dtype, else a ``ValueError``
    naming ``name``, its shape or dtype, and what is needed."""
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(shape)} ({of}); got a {type(ids).__name__}.")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; the shape {tuple(shape)} ({of}) is needed.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {ids.dtype}; integer token ids (e.g. torch.long) are needed.")
    return ids


def count_ids(ids_N: torch.Tensor, num_ids: int) -> torch.Tensor:
    """Occurrences of each id in [0, num_ids): ``torch.bincount(ids_N, minlength=num_ids)``, whose
    length depends on the data for Dynamo (a graph break); under ``torch.compile`` a scatter-add
    into num_ids counters instead."""
    if torch.compiler.is_compiling():
        return ids_N.new_zeros(num_ids).scatter_add_(0, ids_N, torch.ones_like(ids_N))
    return torch.bincount(ids_N, minlength=num_ids)


def positions_in_segment(key_N: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Rank of each entry among the earlier entries with the same key (0, 1, 2, ... in list order).

    This is the buffer slot a token-choice assignment takes in its (group, expert) buffer when the
    assignments are listed in priority order. Sort-based: O(N log N), no N×E one-hot.
    """
    if key_N.numel() == 0:
        return key_N.clone()
    order_N = torch.argsort(key_N, stable=True)
    counts = count_ids(key_N, num_segments)
    starts = torch.cumsum(counts, 0) - counts
    ranks_sorted = torch.arange(key_N.numel(), device=key_N.device) - starts[key_N[order_N]]
    pos_N = torch.empty_like(key_N)
    pos_N[order_N] = ranks_sorted
    return pos_N


@dataclass
class Routing:
    """Who goes where, for T = G·S tokens and E experts.

    Sparse routings (``is_soft`` False) list their kept assignments in priority order (the order in
    which they claimed buffer slots): ``token_idx_N`` indexes the flattened G·S tokens,
    ``expert_idx_N`` the experts, ``weight_N`` is the combine gate. Soft routings carry
    ``dispatch_GSEP`` (softmax over tokens) and ``combine_GSEP`` (softmax over slots).

    Args:
        num_groups: G.
        group_size: S.
        num_experts: E.
        token_idx_N, expert_idx_N, weight_N: kept assignments, priority order (sparse only).
        capacity: slots per expert and group; None means dropless.
        num_choices: assignments the router attempted (valid tokens·K for token choice, E·C for
            expert choice); ``num_choices - N`` were dropped.
        scores_GSE: router probabilities (for losses and analytics).
        mask_GS: valid-token mask (False: padding), or None when every token is valid.
        dispatch_GSEP, combine_GSEP: soft weights (soft only).
        merge_GE: expert-merging weights (SMEAR, Lory): each group runs one FFN whose parameters
            are ``Σ_e merge[g,e]·θ_e``; no assignments.
        residual_T: optional per-token weight r of the input added to the output, ``y += r·x``
            (BASE layers' ``σ(x·w_a) f(x) + (1 − σ(x·w_a)) x``).
    """

    num_groups: int
    group_size: int
    num_experts: int
    token_idx_N: torch.Tensor | None = None
    expert_idx_N: torch.Tensor | None = None
    weight_N: torch.Tensor | None = None
    capacity: int | None = None
    num_choices: int | torch.Tensor = 0
    scores_GSE: torch.Tensor | None = None
    mask_GS: torch.Tensor | None = None
    dispatch_GSEP: torch.Tensor | None = None
    combine_GSEP: torch.Tensor | None = None
    merge_GE: torch.Tensor | None = None
    residual_T: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def is_soft(self) -> bool:
        return self.dispatch_GSEP is not None

    @property
    def is_merged(self) -> bool:
        return self.merge_GE is not None

    @property
    def num_tokens(self) -> int:
        return self.num_groups * self.group_size

    @property
    def num_kept(self) -> int:
        return 0 if (self.is_soft or self.is_merged) else int(self.token_idx_N.numel())

    @property
    def num_dropped(self) -> torch.Tensor:
        """Dropped choices (a tensor, so reading it does not force a host sync)."""
        if self.is_soft or self.is_merged:
            return torch.zeros(())
        return torch.as_tensor(self.num_choices, device=self.token_idx_N.device) - self.token_idx_N.numel()

    def tokens_per_expert(self) -> torch.Tensor:
        """E counts of assignments (soft routings: total dispatch mass per expert; merged routings:
        merge weight × valid tokens of the group, so padding never counts)."""
        if self.is_soft:
            return self.dispatch_GSEP.detach().sum(dim=(0, 1, 3))
        if self.is_merged:
            if self.mask_GS is None:
                return self.merge_GE.detach().sum(0) * self.group_size
            valid_G1 = self.mask_GS.sum(1, keepdim=True).to(self.merge_GE.dtype)
            return (self.merge_GE.detach() * valid_G1).sum(0)
        return count_ids(self.expert_idx_N, self.num_experts)

    def slot_idx_N(self) -> torch.Tensor:
        """Buffer slot of every kept assignment inside its (group, expert) buffer."""
        group_N = torch.div(self.token_idx_N, self.group_size, rounding_mode="floor")
        key_N = group_N * self.num_experts + self.expert_idx_N
        return positions_in_segment(key_N, self.num_groups * self.num_experts)

    def dense_dispatch_combine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The study's dispatch and combine tensors, both G×S×E×C (C = P for soft routings).

        For dropless sparse routings C is the largest buffer any (group, expert) needed.
        """
        if self.is_soft:
            return self.dispatch_GSEP, self.combine_GSEP
        if self.is_merged:
            raise ValueError("a merged routing (SMEAR/Lory) mixes parameters, not tokens: it has no "
                             "dispatch/combine tensors; read merge_GE instead.")
        G, S, E = self.num_groups, self.group_size, self.num_experts
        slot_N = self.slot_idx_N()
        if self.capacity is not None:
            C = self.capacity
        else:
            C = int(slot_N.max().item()) + 1 if slot_N.numel() else 1
        dev = self.token_idx_N.device
        dispatch = torch.zeros(G * S, E, C, device=dev, dtype=self.weight_N.dtype)
        combine = torch.zeros(G * S, E, C, device=dev, dtype=self.weight_N.dtype)
        dispatch[self.token_idx_N, self.expert_idx_N, slot_N] = 1.0
        combine = combine.index_put((self.token_idx_N, self.expert_idx_N, slot_N), self.weight_N)
        return dispatch.view(G, S, E, C), combine.view(G, S, E, C)
