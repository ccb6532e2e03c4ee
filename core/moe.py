"""The MoE layer: router + stacked experts (+ optional shared experts), a drop-in for timm's ``Mlp``.

Sparse routings take the fast path (``Experts.forward_routed``): sort assignments by expert, gather
the tokens, run the experts (block by block on CPU, one grouped matmul per projection on GPU),
scale by the combine gates and scatter-add back, with a hand-written backward.
Soft routings (Soft MoE) take the einsum path over slots. Auxiliary losses stay on the router
(``core.collect_aux_loss``); load statistics accumulate in buffers (``core.routing_stats``).

Shared experts follow DeepSeekMoE (Dai et al., 2024): always-on FFNs added to the routed output.

Legend: T tokens, G groups, S tokens per group, D width, F expert hidden width, O output width,
E experts, P slots per expert, N assignments.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from core.dispatch import LocalDispatcher
from core.experts import Experts
from core.routers.base import Router, check_positive_int
from core.routing import Routing, check_float_input, check_token_ids, check_token_mask


class MoE(nn.Module):
    """Mixture-of-Experts FFN with timm ``Mlp``'s constructor plus keyword-only MoE arguments.

    Args:
        in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop: as timm's
            ``Mlp``; ``hidden_features`` is each expert's hidden width F.
        num_experts: E routed experts.
        router: a callable ``router(dim=D, num_experts=E) -> Router`` (a Hydra ``_partial_``
            config), or a ``Router`` instance to share between layers; default V-MoE top-2.
        group_size: S tokens per routing group; None routes each sequence (``x.shape[-2]``) as one
            group (the whole batch when x is 2-D). A last partial group is padded and masked.
        num_shared_experts: always-on experts of width F each, added to the routed output.
        glu: gated (SwiGLU-style) experts.
        expert_impl: ``"auto"`` | ``"chunked"`` | ``"grouped"`` | ``"loop"`` (see ``Experts``).
        experts: the routed experts' class or factory, called like ``Experts`` (e.g.
            ``functools.partial(LoRAExperts, rank=8)``); default stacked ``Experts``.
        track_stats: accumulate routing statistics for ``core.routing_stats``.

    Inputs: ``x`` (…, D) floating point; ``mask`` None or ``x.shape[:-1]``, bool or 0/1 integer
    (Hugging Face's ``attention_mask``; read as ``mask != 0``; float masks are refused because additive
    attention masks use 0 for real tokens); ``token_ids`` None or ``x.shape[:-1]`` integers. A masked
    token is neither routed nor counted and gets 0 from the routed experts (merged routings included);
    the shared experts are dense FFNs and still apply to every token, masked or not.

    Degenerate inputs (all checks are O(1) shape/dtype checks, no host sync on the hot path):

    - empty batch (``x.numel() == 0``, e.g. (0, S, D) or (B, 0, D)): like ``nn.Linear``, an empty
      output of shape (…, O), still connected to the graph; the router is not called, routing
      statistics are unchanged and the router's auxiliary losses are cleared (they sum to 0);
      ``last_routing`` (if kept) is an empty sparse routing;
    - every token masked: routed output 0 (plus the shared experts), auxiliary losses 0 (nothing to
      balance), statistics count 0 tokens and 0 choices (``core.routing_stats`` reports 0.0, not NaN);
    - NaN or infinite values in ``x``: not checked (that needs a host sync) and never an error from
      any router; they propagate as in ``nn.Linear``: a non-finite token's output is non-finite, or
      exactly 0 when its router dropped it (its NaN scores made it ineligible or it lost the
      capacity race: like any dropped token, the residual connection carries it on); routers that
      mix a group's tokens (Soft MoE, SMEAR, Sinkhorn plans, BASE's assignment) can spread it to
      that group, Lory to the next segment, never to other groups. Auxiliary losses and routing
      statistics may turn NaN; the training loop's non-finite guard names the step;
    - ``ValueError`` naming the argument: ``x`` of a non-floating dtype (integer, bool) or 0-d or of
      the wrong width; ``mask``/``token_ids`` of a shape other than ``x.shape[:-1]``; a float mask;
      float or bool ``token_ids``; at construction, a ``router`` instance whose ``dim`` differs from
      ``in_features`` or whose ``num_experts`` differs from the layer's.

    Example::

        layer = MoE(512, 1024, num_experts=8, router=functools.partial(TopKRouter, top_k=2))
        y = layer(torch.randn(4, 128, 512))   # same shape as x
        loss = task_loss + core.collect_aux_loss(model)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
        use_conv: bool = False,
        device=None,
        dtype=None,
        *,
        num_experts: int = 8,
        router: Callable[..., Router] | Router | None = None,
        group_size: int | None = None,
        num_shared_experts: int = 0,
        glu: bool = False,
        expert_impl: str = "auto",
        experts: Callable[..., nn.Module] | None = None,
        track_stats: bool = True,
    ):
        super().__init__()
        if use_conv:
            raise ValueError("use_conv=True is not supported by MoE: experts are linear FFNs.")
        check_positive_int("in_features", in_features)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        check_positive_int("num_experts", num_experts)
        if group_size is not None:
            check_positive_int("group_size", group_size)
        check_positive_int("num_shared_experts", num_shared_experts, minimum=0)
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.group_size = group_size
        if router is None:  # V-MoE's softmax top-2, imported here so the layer depends on no particular router
            from core.routers.topk import TopKRouter

            router = TopKRouter(in_features, num_experts)
        elif not isinstance(router, Router):
            router = router(dim=in_features, num_experts=num_experts)
            if not isinstance(router, Router):
                raise ValueError(f"router built a {type(router).__name__}, not a core Router: pass a router "
                                 "partial router(dim=D, num_experts=E) -> Router or a Router instance.")
        if router.dim != in_features:
            raise ValueError(f"router.dim={router.dim} does not match in_features={in_features}: a shared router "
                             "must route tokens of the layer's width.")
        if router.num_experts != num_experts:
            raise ValueError(f"router.num_experts={router.num_experts} does not match num_experts={num_experts}: "
                             "a shared router must choose among the layer's experts.")
        self.router = router
        dd = {"device": device, "dtype": dtype}
        self.experts = (experts or Experts)(num_experts, in_features, hidden_features, out_features,
                                            act_layer=act_layer, glu=glu, bias=bias, drop=drop,
                                            norm_layer=norm_layer, impl=expert_impl, **dd)
        self.shared_experts = None
        if num_shared_experts:
            self.shared_experts = Experts(1, in_features, hidden_features * num_shared_experts, out_features,
                                          act_layer=act_layer, glu=glu, bias=bias, drop=drop, impl=expert_impl, **dd)
        self.track_stats = track_stats
        self.register_buffer("stat_tokens_E", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_importance_E", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        # dropped choices, attempted choices, valid tokens, summed routing entropy, forward calls
        self.register_buffer("stat_counters", torch.zeros(5, dtype=torch.float64), persistent=False)
        self.last_routing: Routing | None = None
        self.keep_last_routing = False
        # how kept assignments reach the experts: here (default) or over ranks (``core.dispatch``)
        self.dispatcher = LocalDispatcher()

    def _groups(self, x: torch.Tensor, mask, token_ids):
        """(…, D) -> G×S×D plus the matching mask and token ids, padding a last partial group."""
        D = x.shape[-1]
        x_TD = x.reshape(-1, D)
        T = x_TD.shape[0]
        S = self.group_size or (x.shape[-2] if x.dim() >= 3 else T)
        S = max(1, min(S, T))
        pad = (-T) % S
        mask_T = None if mask is None else mask.reshape(-1).to(torch.bool)
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        if pad:
            x_TD = torch.cat([x_TD, x_TD.new_zeros(pad, D)])
            if mask_T is None:
                mask_T = torch.ones(T, dtype=torch.bool, device=x.device)
            mask_T = torch.cat([mask_T, mask_T.new_zeros(pad)])
            if ids_T is not None:
                ids_T = torch.cat([ids_T, ids_T.new_zeros(pad)])
        G = x_TD.shape[0] // S
        mask_GS = None if mask_T is None else mask_T.view(G, S)
        ids_GS = None if ids_T is None else ids_T.view(G, S)
        return x_TD, x_TD.view(G, S, D), mask_GS, ids_GS, T

    def check_input(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                    token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """O(1) checks of ``forward``'s arguments (see "Degenerate inputs"); returns the mask as bool."""
        D = self.in_features
        check_float_input("x", x, f"(..., in_features={D})")
        if x.dim() == 0 or x.shape[-1] != D:
            raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={D}.")
        of = "x.shape[:-1]"
        token_ids = check_token_ids("token_ids", token_ids, tuple(x.shape[:-1]), of)
        return check_token_mask("mask", mask, tuple(x.shape[:-1]), of), token_ids

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (…, D) -> (…, O). ``mask`` (x.shape[:-1], True = real token) keeps padding out of
        routing and statistics; ``token_ids`` (x.shape[:-1]) feed routers that need them (hash)."""
        mask, token_ids = self.check_input(x, mask, token_ids)
        lead = x.shape[:-1]
        if x.numel() == 0:
            return self._forward_empty(x).view(*lead, self.out_features)
        x_TD, x_GSD, mask_GS, ids_GS, T = self._groups(x, mask, token_ids)
        kwargs = {} if ids_GS is None else {"token_ids_GS": ids_GS}
        routing = self.router(x_GSD, mask_GS, **kwargs)
        if (routing.is_merged or routing.is_soft) and not self.dispatcher.is_local:
            raise ValueError(f"{type(self.router).__name__} mixes every token with every expert, so its experts cannot "
                             "live on different ranks (trainer.expert_parallel=true): pick a sparse router (topk, "
                             "expert_choice, deepseek, ...) or set trainer.expert_parallel=false.")
        if routing.is_merged:
            y_TO = self.experts.forward_merged(x_GSD, routing.merge_GE).reshape(x_TD.shape[0], -1)
            if mask_GS is not None:  # a merged FFN runs on every token of its group; masked ones get 0
                y_TO = y_TO * mask_GS.reshape(-1, 1).to(y_TO.dtype)
        elif routing.is_soft:
            y_TO = self._combine_soft(x_GSD, routing)
        else:
            y_TO = self._combine_sparse(x_TD, routing)
        if routing.residual_T is not None:
            y_TO = y_TO + routing.residual_T.to(y_TO.dtype)[:, None] * x_TD
        y_TO = y_TO[:T]
        if self.shared_experts is not None:
            x_real = x_TD[:T]
            y_TO = y_TO + self.shared_experts(x_real, torch.tensor([T], device=x.device),
                                              torch.zeros(T, dtype=torch.long, device=x.device))
        if self.track_stats:
            self._update_stats(routing)
        if self.keep_last_routing:
            self.last_routing = routing
        return y_TO.view(*lead, self.out_features)

    def _forward_empty(self, x: torch.Tensor) -> torch.Tensor:
        """An empty batch: a 0×O output through the routed (and shared) experts with no assignment,
        so it stays in the autograd graph as ``nn.Linear``'s does. The router is not called."""
        x_TD = x.reshape(0, self.in_features)
        idx_N = torch.zeros(0, dtype=torch.long, device=x.device)
        routing = Routing(
            num_groups=0, group_size=1, num_experts=self.num_experts, token_idx_N=idx_N, expert_idx_N=idx_N,
            weight_N=torch.zeros(0, dtype=torch.float32, device=x.device), capacity=None, num_choices=0,
            scores_GSE=torch.zeros(0, 1, self.num_experts, device=x.device),
        )
        y_TO = self._combine_sparse(x_TD, routing)
        if self.shared_experts is not None:
            y_TO = y_TO + self.shared_experts(x_TD, torch.zeros(1, dtype=torch.long, device=x.device), idx_N)
        self.router.aux_losses = {}
        if self.keep_last_routing:
            self.last_routing = routing
        return y_TO

    def _combine_sparse(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.dispatcher(self.experts, x_TD, routing.token_idx_N, routing.expert_idx_N, routing.weight_N)

    def _combine_soft(self, x_GSD: torch.Tensor, routing: Routing) -> torch.Tensor:
        G, S, _ = x_GSD.shape
        E, P = self.num_experts, routing.capacity
        dispatch = routing.dispatch_GSEP.to(x_GSD.dtype)
        slots_EGPD = torch.einsum("gsep,gsd->egpd", dispatch, x_GSD)
        y_EMO = self.experts.forward_batched(slots_EGPD.reshape(E, G * P, -1))
        y_GSO = torch.einsum("gsep,egpo->gso", routing.combine_GSEP.to(y_EMO.dtype), y_EMO.view(E, G, P, -1))
        return y_GSO.reshape(G * S, -1)

    @torch.no_grad()
    def _update_stats(self, routing: Routing) -> None:
        self.stat_tokens_E += routing.tokens_per_expert().to(torch.float64)
        scores = routing.scores_GSE
        m = None if routing.mask_GS is None else routing.mask_GS[..., None].to(scores.dtype)
        valid = scores if m is None else scores * m
        self.stat_importance_E += valid.sum((0, 1)).to(torch.float64)
        entropy_GS = -(scores * torch.log(scores.clamp_min(1e-20))).sum(-1)
        if m is not None:
            entropy_GS = entropy_GS * m[..., 0]
        n_valid = scores.shape[0] * scores.shape[1] if m is None else m.sum()
        self.stat_counters += torch.stack([
            torch.as_tensor(routing.num_dropped, dtype=torch.float64, device=self.stat_counters.device),
            torch.as_tensor(routing.num_choices, dtype=torch.float64, device=self.stat_counters.device),
            torch.as_tensor(n_valid, dtype=torch.float64, device=self.stat_counters.device),
            entropy_GS.sum().to(torch.float64),
            torch.ones((), dtype=torch.float64, device=self.stat_counters.device),
        ])

    def reset_stats(self) -> None:
        self.stat_tokens_E.zero_()
        self.stat_importance_E.zero_()
        self.stat_counters.zero_()
