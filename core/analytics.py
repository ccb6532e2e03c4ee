"""Routing analytics beyond the per-layer counters of ``core.routing_stats`` (ROUTERS.md §5), as
functions of ``Routing`` values (plus labels), so every domain can use them.

- drop rate by position in the sequence: the share of tokens at position s with at least one
  choice dropped by capacity ("drop towards the end", Xue et al., OpenMoE, arXiv 2402.01739);
- specialisation by a label (token id in nlp, modality in multimodal, task in recsys): the share
  of routing explained by the label, ``1 − H(expert | label)/H(expert)``, the normalised mutual
  information and the purity ``Σ_l n_l max_e q_l(e) / Σ_l n_l`` (OpenMoE's token-id specialisation);
- routing stability between two routings (e.g. two checkpoints on the same tokens): the share of
  token ids whose modal top expert is unchanged;
- null experts (AdaMoE): mean true experts per token and the FLOP ratio to top-K without nulls.

``RoutingRecorder`` accumulates the same quantities for every MoE layer of a model over many
forwards (an evaluation pass) through forward hooks.

A token's *top expert* is its kept assignment with the largest combine weight (−1 when every choice
was dropped); for soft and merged routings, the argmax of ``scores_GSE``.

Legend: G groups, S tokens per group (positions), T = G·S tokens, E experts, L labels, N assignments.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
    of each token; when it is None, the ``token_ids`` passed to the layer are used (nlp).

    Example::

        rec = RoutingRecorder(model)
        for batch in loader:
            model(batch)
        report = rec.summary()   # {layer name: {...}}
        rec.close()
    """

    def __init__(self, model: nn.Module, choices_per_token: int | None = None, min_count: int = 1):
        from core.moe import MoE  # the layer imports the routers; import late to keep this module light

        self.labels: torch.Tensor | None = None
        self.choices_per_token, self.min_count = choices_per_token, min_count
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
            if labels is not None:
                counts = label_expert_counts(routing, labels.detach())
                _accumulate(st, "counts_LE", counts)
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
            if "counts_LE" in st:
                rep["specialisation"] = specialisation_from_counts(st["counts_LE"], self.min_count)
                rep["counts_LE"] = st["counts_LE"]
            out[name] = rep
        return out

    def close(self) -> None:
        """Remove the hooks and restore each layer's ``keep_last_routing``."""
        for h in self._handles:
            h.remove()
        for name, layer in self._layers:
            layer.keep_last_routing = self._state[name]["keep"]
        self._handles = []


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
