"""Routing analytics beyond the per-layer counters of ``core.routing_stats`` (docs/routers.md §5), as
functions of ``Routing`` values (plus labels), so every domain can use them.

- drop rate by position in the sequence: the share of tokens at position s with at least one
  choice dropped by capacity ("drop towards the end", Xue et al., OpenMoE, arXiv 2402.01739);
- specialisation by a label (token id in nlp, modality in multimodal, task in recsys): the share
  of routing explained by the label, ``1 − H(expert | label)/H(expert)``, the normalised mutual
  information and the purity ``Σ_l n_l max_e q_l(e) / Σ_l n_l`` (OpenMoE's token-id specialisation);
- routing stability between two routings (e.g. two checkpoints on the same tokens): the share of
  token ids whose modal top expert is unchanged;
- null experts (AdaMoE): mean true experts per token and the FLOP ratio to top-K without nulls;
- representation collapse (Chi et al., "On the Representation Collapse of Sparse Mixture of
  Experts", NeurIPS 2022, X-MoE): routing by dot products with E gate vectors pulls the gradient of a
  token's representation into the span of those vectors, so representations drift towards a
  subspace of dimension <= E. Measured on the tokens a layer routes: the share of their variance in
  the span of the router's gate vectors, ``tr(P Σ)/tr(Σ)`` (isotropic tokens: rank/D), and the
  effective rank ``exp H(λ/Σλ)`` of their covariance (Roy and Vetterli, EUSIPCO 2007), over D;
- LocMoE's capacity lower bound (Li et al., IJCAI 2024; ``core.routers.locmoe``) for any router
  that scores by gate vectors: δ, the largest angle between a routed token and its expert's gate
  vector, gives ``C_min = ⌈S·A_D(δ)⌉`` for S tokens per group, next to the router's own capacity.

The same analyses in every domain (``analyse_routing``, ``RoutingSnapshots``): the label of a token
is what the domain offers, through ``labels`` providers (``position_labels``, ``example_labels``):
the token id in nlp (OpenMoE's context-independent specialisation), the patch position and the
image's class in vision, the position and the modality in multimodal; early routing learning
compares the (first label × top expert) table of snapshots taken during training with the final one.
Recsys offers none: an example is one token routed once by each task's gate, so it has no position
(no drop rate by position, no positional specialisation), and the task is not a label of the tokens
one gate routes but the choice of gate (its gates are routers, not ``core.MoE`` layers).

``RoutingRecorder`` accumulates the same quantities for every MoE layer of a model over many
forwards (an evaluation pass) through forward hooks.

A token's *top expert* is its kept assignment with the largest combine weight (−1 when every choice
was dropped); for soft and merged routings, the argmax of ``scores_GSE``.

Legend: G groups, S tokens per group (positions), T = G·S tokens, E experts, L labels, N assignments.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from core.engine import Callback
from core.routing import Routing


# ---- per-token views of a routing ----------------------------------------------------------------

def valid_tokens(routing: Routing) -> torch.Tensor:
    """T booleans: the tokens that were routed (not padding)."""
    if routing.mask_GS is None:
        dev = _device(routing)
        return torch.ones(routing.num_tokens, dtype=torch.bool, device=dev)
    return routing.mask_GS.reshape(-1).bool()


def _device(routing: Routing) -> torch.device:
    for t in (routing.token_idx_N, routing.scores_GSE, routing.merge_GE, routing.dispatch_GSEP):
        if t is not None:
            return t.device
    return torch.device("cpu")


def experts_per_token(routing: Routing) -> torch.Tensor:
    """T counts of kept assignments (computing experts) per token; sparse routings only."""
    _require_sparse(routing, "experts_per_token")
    return torch.bincount(routing.token_idx_N, minlength=routing.num_tokens)


def top_expert(routing: Routing) -> torch.Tensor:
    """T expert ids: each token's kept assignment with the largest gate (ties: lowest id), −1 when
    it has none or is padding; soft and merged routings use the argmax of ``scores_GSE``."""
    T, E = routing.num_tokens, routing.num_experts
    valid_T = valid_tokens(routing)
    if routing.is_soft or routing.is_merged:
        top_T = routing.scores_GSE.reshape(T, E).argmax(-1)
        return torch.where(valid_T, top_T, torch.full_like(top_T, -1))
    tok, exp, w = routing.token_idx_N, routing.expert_idx_N, routing.weight_N.detach().float()
    best_T = torch.full((T,), float("-inf"), device=w.device).scatter_reduce(0, tok, w, "amax")
    is_best_N = w == best_T[tok]
    top_T = torch.full((T,), E, dtype=torch.long, device=tok.device)
    top_T = top_T.scatter_reduce(0, tok[is_best_N], exp[is_best_N], "amin")
    return torch.where((top_T < E) & valid_T, top_T, torch.full_like(top_T, -1))


def _require_sparse(routing: Routing, what: str) -> None:
    if routing.is_soft or routing.is_merged:
        raise ValueError(f"{what} needs a sparse routing (assignments); this routing is "
                         f"{'soft' if routing.is_soft else 'merged'}.")


# ---- drop rate by position -----------------------------------------------------------------------

def choices_per_token(routing: Routing, choices: int | None = None) -> torch.Tensor:
    """T numbers of choices each token attempted: ``routing.extras["choices_T"]`` when the router
    records it (GShard, AdaMoE), else ``choices`` for every valid token, else K inferred as
    ``num_choices / valid tokens`` (token choice without eligibility limits)."""
    valid_T = valid_tokens(routing)
    if "choices_T" in routing.extras:
        return routing.extras["choices_T"].reshape(-1).long() * valid_T
    if choices is None:
        n_valid = int(valid_T.sum())
        total = int(torch.as_tensor(routing.num_choices))
        if n_valid == 0:
            return torch.zeros_like(valid_T, dtype=torch.long)
        if total % n_valid:
            raise ValueError(f"cannot infer choices per token ({total} choices over {n_valid} tokens): "
                             "pass choices_per_token= (e.g. 1 for expert choice: tokens no expert took).")
        choices = total // n_valid
    return valid_T.long() * int(choices)


def dropped_by_position(routing: Routing, choices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped_S, valid_S): per position s, tokens with at least one dropped choice and valid tokens."""
    _require_sparse(routing, "drop rate by position")
    G, S = routing.num_groups, routing.group_size
    dropped_T = (experts_per_token(routing) < choices_per_token(routing, choices)) & valid_tokens(routing)
    return dropped_T.view(G, S).sum(0), valid_tokens(routing).view(G, S).sum(0)


def drop_rate_by_position(routing: Routing, choices_per_token: int | None = None,
                          num_bins: int | None = None) -> torch.Tensor:
    """Share of valid tokens at each position (or in each of ``num_bins`` equal position bins) with
    at least one choice dropped by capacity; NaN where a position has no valid token.

    Args:
        routing: a sparse routing.
        choices_per_token: choices a token attempts, when the router does not record them and they
            cannot be inferred (expert choice: 1, counting tokens that no expert took).
        num_bins: average positions into this many bins (None: one value per position).
    """
    dropped_S, valid_S = dropped_by_position(routing, choices_per_token)
    return _binned_rate(dropped_S, valid_S, num_bins)


def _binned_rate(num_S: torch.Tensor, den_S: torch.Tensor, num_bins: int | None) -> torch.Tensor:
    num_S, den_S = num_S.double(), den_S.double()
    if num_bins is not None:
        if num_bins < 1:
            raise ValueError(f"num_bins={num_bins} is not allowed: it must be >= 1.")
        bin_S = torch.arange(num_S.numel(), device=num_S.device) * num_bins // num_S.numel()
        num_S = torch.zeros(num_bins, dtype=torch.double, device=num_S.device).index_add_(0, bin_S, num_S)
        den_S = torch.zeros(num_bins, dtype=torch.double, device=den_S.device).index_add_(0, bin_S, den_S)
    return torch.where(den_S > 0, num_S / den_S.clamp_min(1), torch.full_like(num_S, math.nan))


# ---- specialisation ------------------------------------------------------------------------------

def _labels_T(routing: Routing, labels: torch.Tensor) -> torch.Tensor:
    """Labels for the routing's T tokens; a shorter label tensor (the layer padded a last group)
    leaves the padding unlabelled (−1)."""
    flat = labels.reshape(-1).long().to(_device(routing))
    T = routing.num_tokens
    if flat.numel() > T:
        raise ValueError(f"labels has {flat.numel()} entries; the routing has {T} tokens.")
    if flat.numel() < T:
        flat = torch.cat([flat, flat.new_full((T - flat.numel(),), -1)])
    return flat


def label_expert_counts(routing: Routing, labels: torch.Tensor, num_labels: int | None = None) -> torch.Tensor:
    """L×E counts of (label, top expert) over valid tokens that kept an expert and carry a label >= 0."""
    label_T = _labels_T(routing, labels)
    top_T = top_expert(routing)
    keep = (top_T >= 0) & (label_T >= 0)
    E = routing.num_experts
    L = num_labels if num_labels is not None else int(label_T.max().clamp_min(-1)) + 1
    if keep.any() and int(label_T[keep].max()) >= L:
        raise ValueError(f"num_labels={L} is too small for label {int(label_T[keep].max())}.")
    key = label_T[keep] * E + top_T[keep]
    return torch.bincount(key, minlength=max(L, 0) * E).view(max(L, 0), E)


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum().clamp_min(1e-30)
    return -(p * torch.log(p.clamp_min(1e-30))).sum()


def specialisation_from_counts(counts_LE: torch.Tensor, min_count: int = 1) -> dict[str, float]:
    """Specialisation of an L×E (label, expert) count table; labels with fewer than ``min_count``
    tokens are left out. Returns ``share`` = 1 − H(E|L)/H(E) (= I(E;L)/H(E), 0 when the label says
    nothing about the expert, 1 when it determines it), ``nmi`` = I/((H(E)+H(L))/2), ``purity``
    = Σ_l max_e n_{l,e} / n, ``h_expert``, ``h_expert_given_label`` (nats) and ``tokens``."""
    c = counts_LE.double()
    c = c[c.sum(1) >= min_count]
    n = float(c.sum())
    if n == 0:
        return {"share": math.nan, "nmi": math.nan, "purity": math.nan, "h_expert": math.nan,
                "h_expert_given_label": math.nan, "tokens": 0}
    n_L = c.sum(1)
    h_e = float(_entropy(c.sum(0)))
    h_l = float(_entropy(n_L))
    h_e_given_l = float(sum(float(n_L[i]) / n * float(_entropy(c[i])) for i in range(c.shape[0])))
    mi = max(h_e - h_e_given_l, 0.0)
    return {
        "share": mi / h_e if h_e > 0 else math.nan,
        "nmi": 2 * mi / (h_e + h_l) if h_e + h_l > 0 else math.nan,
        "purity": float(c.max(1).values.sum()) / n,
        "h_expert": h_e,
        "h_expert_given_label": h_e_given_l,
        "tokens": int(n),
    }


def specialisation(routing: Routing, labels: torch.Tensor, num_labels: int | None = None,
                   min_count: int = 1) -> dict[str, float]:
    """How much of the routing (each token's top expert) a label explains.

    Args:
        routing: any routing.
        labels: one integer label per token (x.shape[:-1] or T entries; −1 = unlabelled).
        num_labels: L (default: max label + 1).
        min_count: leave out labels seen fewer times (OpenMoE uses 100 for token ids).
    """
    return specialisation_from_counts(label_expert_counts(routing, labels, num_labels), min_count)


# ---- stability -----------------------------------------------------------------------------------

def stability_from_counts(counts_a_LE: torch.Tensor, counts_b_LE: torch.Tensor, min_count: int = 1,
                          weighted: bool = False) -> float:
    """Share of labels seen at least ``min_count`` times in both tables whose modal expert (ties:
    lowest id) is the same in both; ``weighted`` weighs each label by its count in ``a``."""
    L = min(counts_a_LE.shape[0], counts_b_LE.shape[0])
    a, b = counts_a_LE[:L], counts_b_LE[:L]
    seen = (a.sum(1) >= min_count) & (b.sum(1) >= min_count)
    if not seen.any():
        return math.nan
    same = (a.argmax(1) == b.argmax(1))[seen].double()
    if weighted:
        w = a.sum(1)[seen].double()
        return float((same * w).sum() / w.sum())
    return float(same.mean())


def routing_stability(routing_a: Routing, routing_b: Routing, token_ids: torch.Tensor | None = None,
                      token_ids_b: torch.Tensor | None = None, min_count: int = 1, weighted: bool = False) -> float:
    """Share of token ids whose top expert is unchanged between two routings (OpenMoE's routing
    agreement between checkpoints); the modal top expert over an id's occurrences is compared.

    Args:
        routing_a, routing_b: the two routings (e.g. one evaluation batch through two checkpoints).
        token_ids: token ids of routing_a's tokens; None compares token by token (same tokens in
            both routings): the share of valid tokens whose top expert is unchanged.
        token_ids_b: token ids of routing_b's tokens (default: ``token_ids``).
        min_count: ids seen fewer times in either routing are left out.
        weighted: weigh ids by their count (else every id counts once).
    """
    if token_ids is None:
        ta, tb = top_expert(routing_a), top_expert(routing_b)
        if ta.shape != tb.shape:
            raise ValueError("without token_ids the two routings must cover the same tokens.")
        both = (ta >= 0) & (tb >= 0)
        return float((ta[both] == tb[both]).double().mean()) if both.any() else math.nan
    ids_b = token_ids if token_ids_b is None else token_ids_b
    L = int(max(token_ids.max(), ids_b.max())) + 1
    return stability_from_counts(label_expert_counts(routing_a, token_ids, L),
                                 label_expert_counts(routing_b, ids_b, L), min_count, weighted)


# ---- null experts --------------------------------------------------------------------------------

def null_expert_stats(routing: Routing, reference_top_k: int | None = None) -> dict[str, float]:
    """AdaMoE's compute report: ``true_experts_per_token`` (kept assignments per valid token, i.e.
    true experts that run), ``flop_ratio`` = that / K of the same router without null experts
    (``reference_top_k``, default the router's K from ``routing.extras["top_k"]``), and
    ``null_only_fraction``, the share of valid tokens that run no expert."""
    per_T = experts_per_token(routing)
    valid_T = valid_tokens(routing)
    n_valid = int(valid_T.sum())
    if reference_top_k is None:
        reference_top_k = routing.extras.get("top_k")
    if reference_top_k is None:
        raise ValueError("reference_top_k is needed: the routing does not record its router's top_k.")
    mean = float(per_T[valid_T].double().sum()) / max(n_valid, 1)
    return {
        "true_experts_per_token": mean,
        "flop_ratio": mean / reference_top_k,
        "null_only_fraction": float(((per_T == 0) & valid_T).double().sum()) / max(n_valid, 1),
    }


# ---- accumulation over a model -------------------------------------------------------------------

class RoutingRecorder:
    """Accumulates drop rate by position, label/expert counts and experts per token for every MoE
    layer of a model over many forwards, through forward hooks (no change to the model).

    Labels: ``recorder.labels = tensor`` (x.shape[:-1]) before a forward, e.g. the modality or task
    of each token; when it is None, the ``token_ids`` passed to the layer are used (nlp). Several
    labels: a dict ``{name: tensor or provider}``, a provider being ``f(layer, x) -> labels`` (or None
    where it does not apply); ``summary`` then reports each under ``specialisation_by[name]`` (the
    first also as ``specialisation``). ``collapse=True`` also accumulates each layer's token
    covariance for ``representation_collapse``.

    Example::

        rec = RoutingRecorder(model)
        for batch in loader:
            model(batch)
        report = rec.summary()   # {layer name: {...}}
        rec.close()
    """

    def __init__(self, model: nn.Module, choices_per_token: int | None = None, min_count: int = 1,
                 collapse: bool = False):
        from core.moe import MoE  # the layer imports the routers; import late to keep this module light

        self.labels: torch.Tensor | dict | None = None
        self.choices_per_token, self.min_count, self.collapse = choices_per_token, min_count, collapse
        self._state: dict[str, dict] = {}
        self._handles = []
        self._layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
        for name, layer in self._layers:
            self._state[name] = {"keep": layer.keep_last_routing}
            layer.keep_last_routing = True
            self._handles.append(layer.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            routing: Routing = module.last_routing
            st = self._state[name]
            labels = self.labels if self.labels is not None else kwargs.get("token_ids")
            if labels is None and len(args) > 2:
                labels = args[2]
            x = args[0] if args else kwargs.get("x")
            if self.collapse and x is not None:
                mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
                _accumulate_moments(st, module, x, mask)
                _max_angle(st, module, x, routing)
            if not (routing.is_soft or routing.is_merged):
                st["experts"] = st.get("experts", 0) + int(experts_per_token(routing)[valid_tokens(routing)].sum())
                st["tokens"] = st.get("tokens", 0) + int(valid_tokens(routing).sum())
                try:
                    d_S, v_S = dropped_by_position(routing, self.choices_per_token)
                except ValueError:
                    d_S = v_S = None
                if d_S is not None:
                    _accumulate(st, "dropped_S", d_S)
                    _accumulate(st, "valid_S", v_S)
            named = labels if isinstance(labels, dict) else ({} if labels is None else {"label": labels})
            for key, lab in named.items():
                lab = lab(module, x) if callable(lab) else lab
                if lab is None or lab.numel() != routing.num_tokens - _padding(routing, x):
                    continue  # this label does not describe this layer's tokens
                _accumulate(st.setdefault("counts_by", {}), key, label_expert_counts(routing, lab.detach()))
        return hook

    def summary(self) -> dict[str, dict]:
        """Per layer: ``drop_rate_by_position`` (list), ``experts_per_token``, ``specialisation``."""
        out = {}
        for name, st in self._state.items():
            rep = {}
            if "dropped_S" in st:
                rep["drop_rate_by_position"] = _binned_rate(st["dropped_S"], st["valid_S"], None).tolist()
            if st.get("tokens"):
                rep["experts_per_token"] = st["experts"] / st["tokens"]
            if st.get("counts_by"):
                rep["counts_by"] = dict(st["counts_by"])
                rep["specialisation_by"] = {k: specialisation_from_counts(c, self.min_count)
                                            for k, c in st["counts_by"].items()}
                first = next(iter(st["counts_by"]))
                rep["specialisation"], rep["counts_LE"] = rep["specialisation_by"][first], st["counts_by"][first]
            if "xx_DD" in st:
                rep["collapse"] = representation_collapse(st["xx_DD"], st["x_D"], st["n"], st.get("gate_ED"))
            if "max_angle" in st:
                rep["capacity_bound"] = capacity_bound(st["max_angle"], st["group_size"], st["dim"], st.get("capacity"))
            out[name] = rep
        return out

    def close(self) -> None:
        """Remove the hooks and restore each layer's ``keep_last_routing``."""
        for h in self._handles:
            h.remove()
        for name, layer in self._layers:
            layer.keep_last_routing = self._state[name]["keep"]
        self._handles = []


def _padding(routing: Routing, x: torch.Tensor | None) -> int:
    """Tokens the layer added to fill a last partial group (not in x)."""
    return 0 if x is None else routing.num_tokens - x.reshape(-1, x.shape[-1]).shape[0]


def _accumulate_moments(state: dict, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Add the valid tokens' Σx xᵀ, Σx and count; keep the router's gate vectors (E×D) when it
    scores tokens by dot products with them."""
    x_TD = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if mask is not None:
        x_TD = x_TD[mask.reshape(-1).bool()]
    _accumulate(state, "xx_DD", x_TD.T @ x_TD)
    _accumulate(state, "x_D", x_TD.sum(0))
    state["n"] = state.get("n", 0) + x_TD.shape[0]
    w = getattr(getattr(layer, "router", None), "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[-1] == x_TD.shape[-1]:
        state["gate_ED"] = w.detach().to("cpu", torch.float64).clone()


def _max_angle(state: dict, layer: nn.Module, x: torch.Tensor, routing: Routing) -> None:
    """Keep the largest token–gate angle of the layer's sparse routings (and its group size and capacity)."""
    from core.routers.locmoe import max_angular_deviation

    gate = state.get("gate_ED")
    if gate is None or routing.is_soft or routing.is_merged:
        return
    x_TD = x.detach().reshape(-1, x.shape[-1])
    keep = routing.token_idx_N < x_TD.shape[0]  # assignments of padding tokens (none) left out
    angle = float(max_angular_deviation(x_TD, gate.to(x_TD.device), routing.token_idx_N[keep],
                                        routing.expert_idx_N[keep]))
    state["max_angle"] = max(state.get("max_angle", 0.0), angle)
    state["group_size"], state["dim"] = routing.group_size, x_TD.shape[-1]
    capacity = getattr(getattr(layer, "router", None), "capacity", None)
    state["capacity"] = capacity(routing.group_size) if callable(capacity) else None


def capacity_bound(max_angle: float, group_size: int, dim: int, capacity: int | None = None) -> dict:
    """LocMoE's ``C_min = ⌈S·A_D(δ)⌉`` for S = ``group_size`` tokens of width D whose largest angle to their
    expert's gate vector is δ = ``max_angle``, with the router's ``capacity`` (None: dropless) for comparison."""
    from core.routers.locmoe import capacity_lower_bound

    return {"max_angle": max_angle, "group_size": group_size, "dim": dim,
            "lower_bound": capacity_lower_bound(group_size, dim, max_angle), "router_capacity": capacity}


def representation_collapse(xx_DD: torch.Tensor, x_D: torch.Tensor, n: int,
                            gate_ED: torch.Tensor | None = None) -> dict[str, float]:
    """X-MoE's representation collapse from a layer's token moments (see the module docstring):
    ``effective_rank`` ``exp H(λ/Σλ)`` of the token covariance (λ its eigenvalues) and its ratio to
    D; with gate vectors, ``gate_span_share`` ``tr(P Σ)/tr(Σ)`` (P the projection onto their span)
    against ``gate_span_isotropic`` = rank/D, the share isotropic tokens would have."""
    D = xx_DD.shape[0]
    if n < 2:
        return {"effective_rank": math.nan, "effective_rank_ratio": math.nan, "dim": D, "tokens": n}
    mean = x_D / n
    cov = (xx_DD - n * torch.outer(mean, mean)) / (n - 1)
    lam = torch.linalg.eigvalsh(cov).clamp_min(0)
    p = lam / lam.sum().clamp_min(1e-300)
    erank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
    out = {"effective_rank": erank, "effective_rank_ratio": erank / D, "dim": D, "tokens": n}
    if gate_ED is not None:
        q, r = torch.linalg.qr(gate_ED.T)  # D×E orthonormal basis of the gate vectors' span
        rank = int((r.diagonal().abs() > 1e-9 * r.diagonal().abs().max().clamp_min(1e-300)).sum())
        q = q[:, r.diagonal().abs() > 1e-9 * r.diagonal().abs().max().clamp_min(1e-300)]
        out["gate_span_share"] = float(torch.trace(q.T @ cov @ q) / torch.trace(cov).clamp_min(1e-300))
        out["gate_span_isotropic"] = rank / D
    return out


def _accumulate(state: dict, key: str, value: torch.Tensor) -> None:
    """Add ``value`` into ``state[key]``, zero-padding along dim 0 when shapes differ (positions of
    a longer sequence, labels not seen before)."""
    value = value.detach().to("cpu", torch.float64)
    if key not in state:
        state[key] = value.clone()
        return
    old = state[key]
    if old.shape[0] < value.shape[0]:
        old = torch.cat([old, old.new_zeros((value.shape[0] - old.shape[0],) + old.shape[1:])])
    elif value.shape[0] < old.shape[0]:
        value = torch.cat([value, value.new_zeros((old.shape[0] - value.shape[0],) + value.shape[1:])])
    state[key] = old + value


# ---- labels a domain offers ----------------------------------------------------------------------

def position_labels(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Label provider: each token's position in its sequence (dim −2 of the layer's input; the patch
    position in vision, the token position in text)."""
    if x.dim() < 3:
        return torch.arange(x.shape[0], device=x.device)
    S = x.shape[-2]
    return torch.arange(S, device=x.device).expand(x.shape[:-1])


def example_labels(values: torch.Tensor):
    """Label provider: one label per example (``values[b]``, e.g. an image's class) for every token of
    example b; None for a layer whose input does not start with the batch dimension."""
    def provider(layer: nn.Module, x: torch.Tensor):
        if x.dim() < 3 or x.shape[0] != values.shape[0]:
            return None
        shape = (values.shape[0],) + (1,) * (x.dim() - 2)
        return values.to(x.device).reshape(shape).expand(x.shape[:-1])
    return provider


def constant_labels(attr: str, names: tuple[str, ...]):
    """Label provider: the same label for every token of a layer, read from the layer's attribute
    ``attr`` (e.g. ``modality`` of a CLIP tower's layers) as its index in ``names``; None without it."""
    def provider(layer: nn.Module, x: torch.Tensor):
        value = getattr(layer, attr, None)
        if value not in names:
            return None
        return torch.full(x.shape[:-1], names.index(value), dtype=torch.long, device=x.device)
    return provider


# ---- the analyses of a trained model (any domain) ------------------------------------------------

class RoutingCapture:
    """Context: eval mode, no routing statistics, a ``RoutingRecorder`` on every MoE layer; router
    attributes may be changed for the duration (capacity factor and BPR for the drop-rate analysis)."""

    def __init__(self, model: nn.Module, min_count: int = 1, collapse: bool = False, **router_attrs):
        self.model, self.min_count, self.collapse, self.router_attrs = model, min_count, collapse, router_attrs

    def __enter__(self) -> RoutingRecorder:
        self.was_training = self.model.training
        self.saved = []
        for m in moe_layers(self.model):
            self.saved.append((m, m.track_stats, {k: getattr(m.router, k) for k in self.router_attrs}))
            m.track_stats = False
            for k, v in self.router_attrs.items():
                setattr(m.router, k, v)
        self.model.eval()
        self.recorder = RoutingRecorder(self.model, min_count=self.min_count, collapse=self.collapse)
        return self.recorder

    def __exit__(self, *exc):
        self.recorder.close()
        for m, track, old in self.saved:
            m.track_stats, m.last_routing = track, None
            for k, v in old.items():
                setattr(m.router, k, v)
        self.model.train(self.was_training)
        return False


def moe_layers(model: nn.Module) -> list:
    from core.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def _first_input_forward(model: nn.Module, batch) -> None:
    """Default forward of the analyses: the model on a batch's first element (nlp: token ids)."""
    device = next(model.parameters()).device
    model(batch[0].to(device))


@torch.no_grad()
def record_routing(model: nn.Module, batches, max_batches: int, min_count: int = 1, forward=None, labels=None,
                   collapse: bool = False, **router_attrs) -> list[dict]:
    """Per MoE layer, ``RoutingRecorder``'s summary over the first ``max_batches`` batches.

    Args:
        forward: ``(model, batch) -> None`` runs the model on a batch (default: on ``batch[0]``).
        labels: ``batch -> {name: tensor or provider}`` (None: the token ids the layers receive).
        collapse: also the representation-collapse measure.
        router_attrs: router attributes set for the duration (``capacity_factor=1.0``).
    """
    forward = forward or _first_input_forward
    with RoutingCapture(model, min_count, collapse, **router_attrs) as rec:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            rec.labels = labels(batch) if labels is not None else None
            forward(model, batch)
        summary = rec.summary()
    return list(summary.values())


def drop_summary(layers: list[dict]) -> dict | None:
    """Drop rate by position averaged over layers: per position, and in the first and last quarter."""
    rates = [r["drop_rate_by_position"] for r in layers if "drop_rate_by_position" in r]
    if not rates:
        return None
    S = max(len(r) for r in rates)
    rates_pad = [r + [math.nan] * (S - len(r)) for r in rates]
    mean_S = torch.tensor(rates_pad, dtype=torch.float64).nanmean(0)
    q = max(1, mean_S.numel() // 4)
    return {"per_position": mean_S.tolist(), "per_layer": rates, "mean": float(mean_S.nanmean()),
            "first_quarter": float(mean_S[:q].nanmean()), "last_quarter": float(mean_S[-q:].nanmean())}


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _snapshot_tables(snap) -> list[dict]:
    """A snapshot's per-layer tables as ``{label name: counts}`` (older snapshots: one table per layer)."""
    return [t if isinstance(t, dict) else {None: t} for t in snap]


def analyse_routing(model: nn.Module, batches, analysis_cfg, snapshots: dict | None = None, forward=None,
                    labels=None, not_applicable: dict | None = None) -> dict:
    """The routing analyses of a trained model in any domain (OpenMoE, Xue et al. 2024; X-MoE, Chi et al.
    2022): specialisation by each label (``explained_by_<label>``, ``<label>_purity``), early routing
    learning (``stability``: agreement of the first label's modal top expert between each snapshot and
    the end), drop rate by position without and with BPR (at the router's capacity, or
    ``analysis.capacity_factor`` for dropless routers), representation collapse per layer, and
    AdaMoE's true experts per token. ``not_applicable`` ``{analysis: reason}`` is recorded as is.
    What a router offers is read off its attributes, never its name."""
    a = analysis_cfg
    moes = moe_layers(model)
    if not moes:
        return {}
    router = moes[0].router
    layers = record_routing(model, batches, a.max_batches, a.min_token_count, forward, labels, collapse=True)
    out: dict = {"experts_per_token_layers": [r.get("experts_per_token") for r in layers]}
    names = list(next((r["specialisation_by"] for r in layers if "specialisation_by" in r), {}))
    for name in names:
        spec = [r.get("specialisation_by", {}).get(name) for r in layers]
        present = [s for s in spec if s is not None]
        key = "token_id" if name == "label" else name
        if name == names[0]:
            out["specialisation_layers"] = spec
        out[f"explained_by_{key}"] = _mean([s["share"] for s in present])
        out[f"{key}_purity"] = _mean([s["purity"] for s in present])
        out[f"{key}_layers"] = len(present)
    if names:
        out["uniform_purity"] = 1.0 / router.num_experts
    collapse = [r.get("collapse") for r in layers]
    if any(c is not None for c in collapse):
        out["representation_collapse"] = {
            "layers": collapse,
            "effective_rank_ratio": _mean([c["effective_rank_ratio"] for c in collapse if c]),
            "gate_span_share": _mean([c.get("gate_span_share") for c in collapse if c]),
            "gate_span_isotropic": _mean([c.get("gate_span_isotropic") for c in collapse if c])}
    bounds = [r.get("capacity_bound") for r in layers]
    if any(b is not None for b in bounds):
        out["capacity_bound"] = {"layers": bounds,
                                 "lower_bound_share": _mean([b["lower_bound"] / b["group_size"] for b in bounds if b]),
                                 "router_capacity_share": _mean([b["router_capacity"] / b["group_size"] for b in bounds
                                                                 if b and b["router_capacity"] is not None])}
    if snapshots and names:
        final = [r.get("counts_by", {}) for r in layers]
        out["stability"] = {}
        for step, snap in sorted(snapshots.items()):
            agree = []
            for s, f in zip(_snapshot_tables(snap), final):
                s_t = s.get(names[0], s.get(None))
                agree.append(None if s_t is None or names[0] not in f else
                             stability_from_counts(s_t, f[names[0]], a.min_token_count, weighted=True))
            out["stability"][str(step)] = {"agreement": _mean(agree), "agreement_layers": agree}
        out["stability_label"] = "token_id" if names[0] == "label" else names[0]
    if hasattr(router, "capacity_factor"):
        cf = router.capacity_factor if router.capacity_factor is not None else a.capacity_factor
        drops: dict = {"capacity_factor": cf, "router_capacity_factor": router.capacity_factor}
        variants = {"no_bpr": {"capacity_factor": cf}}
        if hasattr(router, "batch_priority"):
            variants = {"no_bpr": {"capacity_factor": cf, "batch_priority": False},
                        "bpr": {"capacity_factor": cf, "batch_priority": True}}
        for key, attrs in variants.items():
            summary = drop_summary(record_routing(model, batches, a.max_batches, a.min_token_count, forward,
                                                  labels, **attrs))
            if summary is not None:
                drops[key] = summary
        out["drop_rate_by_position"] = drops
    if hasattr(router, "num_null_experts"):
        true_ept = _mean(out["experts_per_token_layers"])
        out["null_experts"] = {
            "num_null_experts": router.num_null_experts, "top_k": router.top_k,
            "true_experts_per_token": true_ept, "true_experts_per_token_layers": out["experts_per_token_layers"],
            "baseline_top_k": a.baseline_top_k,
            "expert_flop_ratio_to_baseline": None if true_ept is None else true_ept / a.baseline_top_k,
        }
    if not_applicable:
        out["not_applicable"] = dict(not_applicable)
    return out


def snapshot_steps(fractions, total_steps: int) -> list[int]:
    """The optimizer steps before which ``RoutingSnapshots`` records: ``int(f·total)`` for 0 <= f < 1."""
    return sorted({int(f * total_steps) for f in (fractions or []) if 0 <= f < 1})


def plain(v):
    """JSON fallback of ``analysis.json``: tensors as lists, anything else as text."""
    return v.tolist() if torch.is_tensor(v) else str(v)


def analysis_summary(analysis: dict) -> dict:
    """The scalar part of ``analysis.json``, for ``metrics.json``."""
    keys = [k for k in analysis if k.startswith("explained_by_") or k.endswith("_purity")]
    out = {k: analysis.get(k) for k in keys}
    if "stability" in analysis:
        out["routing_agreement"] = {step: v["agreement"] for step, v in analysis["stability"].items()}
    drops = analysis.get("drop_rate_by_position")
    if drops:
        out["drop_capacity_factor"] = drops["capacity_factor"]
        for key in ("no_bpr", "bpr"):
            if key in drops:
                out[f"drop_rate_{key}"] = {k: drops[key][k] for k in ("mean", "first_quarter", "last_quarter")}
    bound = analysis.get("capacity_bound")
    if bound:
        out["capacity_lower_bound_share"] = bound["lower_bound_share"]
        out["router_capacity_share"] = bound["router_capacity_share"]
    collapse = analysis.get("representation_collapse")
    if collapse:
        for k in ("effective_rank_ratio", "gate_span_share", "gate_span_isotropic"):
            out[k] = collapse[k]
    if "null_experts" in analysis:
        out["true_experts_per_token"] = analysis["null_experts"]["true_experts_per_token"]
        out["expert_flop_ratio_to_baseline"] = analysis["null_experts"]["expert_flop_ratio_to_baseline"]
    return out


class RoutingSnapshots(Callback):
    """Records the (label × top expert) counts of every MoE layer before the chosen training steps,
    for early routing learning (OpenMoE; Xue et al. 2024). Snapshots are saved in the run directory,
    so a resumed run keeps the ones taken before it was killed.

    Args:
        steps: the optimizer steps before which to record.
        batches: the batches to route (a validation loader).
        max_batches: how many of them.
        out_dir: the run directory (``routing_snapshots.pt``).
        forward, labels: as ``record_routing``.
    """

    calls_model = True

    def __init__(self, steps: list[int], batches, max_batches: int, out_dir: Path, forward=None, labels=None):
        self.steps, self.batches, self.max_batches = set(steps), batches, max_batches
        self.forward, self.labels = forward, labels
        self.path = Path(out_dir) / "routing_snapshots.pt"
        self.snapshots: dict = torch.load(self.path) if self.path.exists() else {}

    def on_step_start(self, trainer, model, state) -> None:
        from core.distributed import is_main_process

        if state.step in self.steps and state.step not in self.snapshots:
            layers = record_routing(model, self.batches, self.max_batches, forward=self.forward, labels=self.labels)
            self.snapshots[state.step] = [r.get("counts_by", {}) for r in layers]
            if is_main_process():  # under torchrun every rank records the same snapshot
                tmp = self.path.with_name(self.path.name + ".tmp")
                torch.save(self.snapshots, tmp)
                tmp.replace(self.path)
