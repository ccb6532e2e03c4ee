"""Router invariants, run over every ``conf/router/*.yaml`` (a new router file is picked up by the
glob in ``tests/conftest.py``), plus the specific facts of the router study's routers.

The invariant checks read only the ``Routing`` value, by kind: sparse (assignment lists), soft
(dispatch/combine weights) or merged (expert-merging weights). Tolerances: Sinkhorn plan rows sum to
1 within 1e-5 (the last Sinkhorn step normalises rows); columns to S_valid/E within 5% relative
(20 iterations on logits of order 1 leave errors below 2%); sparsity-constrained plans meet their
sparse side's marginal within 1e-4 relative (it is exact by construction).
"""

from __future__ import annotations

import math

import pytest
import torch

from core import collect_aux_loss
from core.moe import MoE
from core.routers.base import Router
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.topk import TopKRouter
from core.routing import Routing
from core.transport import ksparse_plan, project_ksparse_simplex, sinkhorn_plan


pytestmark = pytest.mark.usefixtures("one_thread")

D = 16
# (G, S, E, masked): S a multiple of E and E even (BASE layers, hierarchical routing need them)
CASES = [(1, 8, 4, False), (1, 8, 4, True), (3, 16, 8, True), (2, 12, 6, False)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _mask(G: int, S: int) -> torch.Tensor:
    """Random padding with at least one real token per group, and (G > 1) one fully padded group."""
    mask = torch.rand(G, S) > 0.4
    mask[:, 0] = True
    if G > 1:
        mask[-1] = False
    return mask


def _route(router: Router, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None, ids_GS: torch.Tensor) -> Routing:
    kwargs = {"token_ids_GS": ids_GS} if router.needs_token_ids else {}
    return router(x_GSD, mask_GS, **kwargs)


def _valid(mask_GS, G, S) -> torch.Tensor:
    return torch.ones(G, S, dtype=torch.bool) if mask_GS is None else mask_GS


def _group_expert_counts(routing: Routing) -> torch.Tensor:
    G, S, E = routing.num_groups, routing.group_size, routing.num_experts
    key = torch.div(routing.token_idx_N, S, rounding_mode="floor") * E + routing.expert_idx_N
    return torch.bincount(key, minlength=G * E).view(G, E)


def check_sparse(routing: Routing, router: Router, mask_GS) -> None:
    G, S, E = routing.num_groups, routing.group_size, routing.num_experts
    valid_T = _valid(mask_GS, G, S).reshape(-1)
    tok, exp, w = routing.token_idx_N, routing.expert_idx_N, routing.weight_N
    assert tok.dtype == torch.long and exp.dtype == torch.long
    assert tok.shape == exp.shape == w.shape and tok.dim() == 1
    if tok.numel():
        assert 0 <= tok.min() and tok.max() < G * S, "token index out of range"
        assert 0 <= exp.min() and exp.max() < E, "expert index out of range"
    assert torch.isfinite(w).all() and (w >= 0).all(), "combine weights must be finite and >= 0"
    assert valid_T[tok].all(), "a masked token received an assignment"
    assert torch.unique(tok * E + exp).numel() == tok.numel(), "a (token, expert) pair is listed twice"
    assert int(routing.num_dropped) >= 0
    counts_GE = _group_expert_counts(routing)
    if routing.capacity is not None:
        assert counts_GE.max() <= routing.capacity, "a (group, expert) buffer is over capacity"
    torch.testing.assert_close(routing.tokens_per_expert(), counts_GE.sum(0))

    if "ExpertChoice" in type(router).__name__:
        C = routing.capacity
        n_valid_G1 = _valid(mask_GS, G, S).sum(1, keepdim=True)
        if "nonzero_limit" in routing.extras:  # the plan's zeros may leave slots empty
            assert (counts_GE <= C).all()
        else:
            assert torch.equal(counts_GE, torch.minimum(n_valid_G1, torch.tensor(C)).expand(G, E)), \
                "an expert-choice expert did not fill min(C, valid tokens) slots"
            assert int(routing.num_dropped) == 0, "slots padding cannot fill were counted as dropped"

    dispatch, combine = routing.dense_dispatch_combine()
    assert dispatch.shape[:3] == combine.shape[:3] == (G, S, E)
    assert ((dispatch == 0) | (dispatch == 1)).all(), "sparse dispatch must be 0/1"
    assert dispatch.sum(1).max() <= 1, "a slot holds more than one token"
    assert dispatch.sum(3).max() <= 1, "a (token, expert) pair holds more than one slot"
    assert dispatch.sum() == tok.numel()
    assert (combine[dispatch == 0] == 0).all(), "combine weight outside the dispatched slots"
    torch.testing.assert_close(combine.sum(3).reshape(G * S, E)[tok, exp], w)


def check_soft(routing: Routing, mask_GS) -> None:
    G, S, E = routing.num_groups, routing.group_size, routing.num_experts
    dispatch, combine = routing.dispatch_GSEP, routing.combine_GSEP
    P = routing.capacity
    assert dispatch.shape == combine.shape == (G, S, E, P)
    for t in (dispatch, combine):
        assert torch.isfinite(t).all() and (t >= 0).all()
    valid_GS = _valid(mask_GS, G, S)
    # dispatch: a softmax over the (valid) tokens of the group; an all-padded group feeds nothing
    has_tokens_G = valid_GS.any(1).float()
    torch.testing.assert_close(dispatch.sum(1), has_tokens_G[:, None, None].expand(G, E, P))
    # combine: a softmax over all E·P slots for each valid token; padded tokens get nothing
    torch.testing.assert_close(combine.sum((2, 3)), valid_GS.float())
    assert (dispatch[~valid_GS] == 0).all(), "a masked token feeds a slot"


def check_merged(routing: Routing) -> None:
    G, E = routing.num_groups, routing.num_experts
    assert routing.merge_GE.shape == (G, E)
    assert torch.isfinite(routing.merge_GE).all() and (routing.merge_GE >= 0).all()


def check_plan(routing: Routing, mask_GS) -> None:
    G, S, E = routing.num_groups, routing.group_size, routing.num_experts
    plan = routing.extras["plan_GSE"]
    assert plan.shape == (G, S, E)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    valid_GS = _valid(mask_GS, G, S)
    assert (plan[~valid_GS] == 0).all(), "a masked token has plan mass"
    col_target_GE = (valid_GS.sum(1, keepdim=True).float() / E).expand(G, E)
    if "nonzero_limit" in routing.extras:
        side, k = routing.extras["nonzero_limit"]
        assert side in ("row", "column")
        if side == "row":
            assert (plan > 0).sum(2).max() <= k, f"a plan row has more than {k} nonzeros"
            torch.testing.assert_close(plan.sum(2), valid_GS.float(), rtol=1e-4, atol=1e-4)
        else:
            assert (plan > 0).sum(1).max() <= k, f"a plan column has more than {k} nonzeros"
            torch.testing.assert_close(plan.sum(1), col_target_GE, rtol=1e-4, atol=1e-4)
        if not routing.is_soft and routing.token_idx_N.numel():
            assert (plan.reshape(G * S, E)[routing.token_idx_N, routing.expert_idx_N] > 0).all(), \
                "an assignment sits on a zero of the sparse plan"
    else:  # entropic (Sinkhorn) plan: rows exact, columns approximate
        torch.testing.assert_close(plan.sum(2), valid_GS.float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(plan.sum(1), col_target_GE, rtol=5e-2, atol=1e-5)


def check_routing(routing: Routing, router: Router, G: int, S: int, E: int, mask_GS) -> None:
    assert isinstance(routing, Routing)
    assert (routing.num_groups, routing.group_size, routing.num_experts) == (G, S, E)
    if routing.scores_GSE is not None:
        assert routing.scores_GSE.shape == (G, S, E)
        assert torch.isfinite(routing.scores_GSE).all() and (routing.scores_GSE >= 0).all()
    if routing.residual_T is not None:
        assert routing.residual_T.shape == (G * S,) and torch.isfinite(routing.residual_T).all()
    if routing.is_merged:
        check_merged(routing)
    elif routing.is_soft:
        check_soft(routing, mask_GS)
    else:
        check_sparse(routing, router, mask_GS)
    if "plan_GSE" in routing.extras:
        check_plan(routing, mask_GS)


def _routing_key(routing: Routing) -> list[torch.Tensor]:
    """What two identical routings must share."""
    if routing.is_merged:
        return [routing.merge_GE]
    if routing.is_soft:
        return [routing.dispatch_GSEP, routing.combine_GSEP]
    return [routing.token_idx_N, routing.expert_idx_N, routing.weight_N]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "G{}S{}E{}-{}".format(*c[:3], "mask" if c[3] else "nomask"))
def test_router_invariants(router_name, make_router, case, train):
    G, S, E, masked = case
    router = make_router(router_name)(dim=D, num_experts=E)
    assert isinstance(router, Router) and router.num_experts == E and router.dim == D
    router.train(train)
    x = torch.randn(G, S, D)
    mask = _mask(G, S) if masked else None
    ids = torch.randint(0, 50, (G, S))
    routing = _route(router, x, mask, ids)
    check_routing(routing, router, G, S, E, mask)
    if train:
        for name, value in router.aux_losses.items():
            assert value.dim() == 0 and torch.isfinite(value), name
    else:
        assert router.aux_losses == {}, "auxiliary losses must be empty at eval"
        again = _route(router, x, mask, ids)  # no training noise: eval routing is deterministic
        for a, b in zip(_routing_key(routing), _routing_key(again)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_router_gradients_reach_parameters(router_name, make_router, masked):
    """A loss through an MoE layer built with the router reaches every trainable router parameter."""
    E = 4
    layer = MoE(D, 32, num_experts=E, router=make_router(router_name)).train()
    x = torch.randn(3, 8, D, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(3, 8) > 0.3
        mask[:, 0] = True
    token_ids = torch.randint(0, 50, (3, 8)) if layer.router.needs_token_ids else None
    y = layer(x, mask=mask, token_ids=token_ids)
    assert y.shape == x.shape and torch.isfinite(y).all()
    loss = (y * torch.randn_like(y)).sum() + collect_aux_loss(layer)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = [(n, p) for n, p in layer.router.named_parameters() if p.requires_grad]
    for name, p in params:
        assert p.grad is not None, f"no gradient reaches router parameter {name}"
        assert torch.isfinite(p.grad).all(), name
    if params:
        assert sum(float(p.grad.abs().sum()) for _, p in params) > 0, "router gradients are all zero"


def test_router_rejects_bad_sizes(router_name, make_router):
    partial = make_router(router_name)
    with pytest.raises(ValueError, match="num_experts"):
        partial(dim=D, num_experts=0)
    with pytest.raises(ValueError, match="dim"):
        partial(dim=0, num_experts=4)


def test_causal_routers_ignore_later_tokens(router_name, make_router):
    """A router that says ``is_causal`` routes the first half of a group the same whatever the
    second half holds (the assignment of token s may not depend on tokens after s)."""
    G, S, E = 2, 16, 4
    router = make_router(router_name)(dim=D, num_experts=E).eval()
    x = torch.randn(G, S, D)
    x2 = x.clone()
    x2[:, S // 2:] = 3 * torch.randn(G, S - S // 2, D)
    ids = torch.randint(0, 50, (G, S))
    ids2 = ids.clone()
    ids2[:, S // 2:] = torch.randint(0, 50, (G, S - S // 2))
    a, b = _route(router, x, None, ids), _route(router, x2, None, ids2)
    assert isinstance(router.is_causal, bool)
    # does not apply: non-causal routers; merged routings (one merge per group, no per-token routing)
    if not router.is_causal or a.is_merged:
        return
    first = slice(0, S // 2)
    if a.is_soft:
        wa, wb = a.combine_GSEP, b.combine_GSEP
    else:
        wa, wb = (t.dense_dispatch_combine()[1].sum(3) for t in (a, b))
    torch.testing.assert_close(wa[:, first], wb[:, first], rtol=0, atol=1e-6)


def _token_weights(routing: Routing) -> torch.Tensor:
    """Each token's weights per expert, tokens of every group in a row (G·S rows)."""
    if routing.is_soft:   # what a token receives from each expert, and what it sends to each
        w = torch.cat([routing.combine_GSEP.sum(3), routing.dispatch_GSEP.sum(3)], dim=-1)
    else:
        w = routing.dense_dispatch_combine()[1].sum(3)
    return w.reshape(-1, w.shape[-1])


def test_eval_group_dependent_says_whether_a_token_routes_alone_as_in_its_group(router_name, make_router):
    """``Router.eval_group_dependent`` is what the domains read to decide whether evaluation needs fixed
    routing groups (recsys, multimodal). A router that says False routes each of 12 tokens alone (12
    groups of one) exactly as in their group of 12; one that says True routes some token differently
    on tokens that all prefer the same experts (so capacity binds), or cannot route a group of one."""
    S, E = 12, 4
    router = make_router(router_name)(dim=D, num_experts=E).eval()
    x = torch.randn(1, 1, D) + 0.05 * torch.randn(1, S, D)   # near-identical tokens: capacity binds
    ids = torch.randint(0, 50, (1, S))
    with torch.no_grad():
        together = _route(router, x, None, ids)
        try:
            alone = _route(router, x.view(S, 1, D), None, ids.view(S, 1))
        except ValueError:   # groups of one refused (BASE: a multiple of E)
            assert router.eval_group_dependent, f"{router_name} cannot route a token alone"
            return
    if together.is_merged:   # one merged expert per group: a group's output mixes its tokens
        assert router.eval_group_dependent
        return
    a, b = _token_weights(together), _token_weights(alone)
    same = a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)
    assert same != router.eval_group_dependent, (router_name, router.eval_group_dependent, (a - b).abs().max())


# ---- specific routers --------------------------------------------------------------------------

def test_sinkhorn_constant_logits_give_uniform_plan():
    plan = sinkhorn_plan(torch.zeros(2, 6, 3))
    torch.testing.assert_close(plan, torch.full((2, 6, 3), 1 / 3))


def test_ksparse_simplex_projection():
    x = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(project_ksparse_simplex(x, 3), x)
    torch.testing.assert_close(project_ksparse_simplex(x, 2), torch.tensor([[0.6, 0.4, 0.0]]))
    torch.testing.assert_close(project_ksparse_simplex(x, 1), torch.tensor([[1.0, 0.0, 0.0]]))
    y = project_ksparse_simplex(torch.randn(5, 7), 3)
    assert ((y > 0).sum(-1) <= 3).all() and (y >= 0).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(5))


@pytest.mark.parametrize("sparse_rows", [True, False], ids=["rows", "columns"])
def test_ksparse_plan_marginals(sparse_rows):
    probs = torch.randn(2, 12, 4).softmax(-1)
    k = 2 if sparse_rows else 3
    plan = ksparse_plan(probs, k, sparse_rows=sparse_rows)
    if sparse_rows:
        assert ((plan > 0).sum(2) <= k).all()
        torch.testing.assert_close(plan.sum(2), torch.ones(2, 12))
    else:
        assert ((plan > 0).sum(1) <= k).all()
        torch.testing.assert_close(plan.sum(1), torch.full((2, 4), 3.0))


def test_topk_gate_is_the_selected_softmax_value():
    router = TopKRouter(D, 4, top_k=2, capacity_factor=None).eval()
    x = torch.randn(2, 8, D)
    routing = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1).reshape(-1, 4)
    torch.testing.assert_close(routing.weight_N, probs[routing.token_idx_N, routing.expert_idx_N])
    assert routing.num_kept == 2 * 8 * 2


def test_topk_renormalize_gates_sum_to_one():
    router = TopKRouter(D, 4, top_k=2, capacity_factor=None, renormalize=True).eval()
    routing = router(torch.randn(2, 8, D))
    per_token = torch.zeros(16).index_add_(0, routing.token_idx_N, routing.weight_N)
    torch.testing.assert_close(per_token, torch.ones(16))


def test_noise_only_in_training():
    router = TopKRouter(D, 4)
    x = torch.randn(1, 32, D)
    router.train()
    a, b = router(x), router(x)
    assert not torch.equal(a.scores_GSE, b.scores_GSE)
    router.eval()
    torch.testing.assert_close(router(x).scores_GSE, torch.softmax(x @ router.weight.t(), -1))


def test_capacity_formulas():
    tc = TopKRouter(D, 8, top_k=2, capacity_factor=1.05)
    assert tc.capacity(64) == math.ceil(64 * 2 * 1.05 / 8)
    assert TopKRouter(D, 8, capacity_factor=1.05, capacity_multiple_of=4).capacity(64) == 20
    assert TopKRouter(D, 8, capacity_factor=None).capacity(64) is None
    assert ExpertChoiceRouter(D, 8, capacity_factor=2.0).capacity(30) == math.ceil(30 * 2 / 8)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0], ids=str)
def test_bad_capacity_factor(bad):
    with pytest.raises(ValueError, match="capacity_factor"):
        TopKRouter(D, 4, capacity_factor=bad)
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(D, 4, capacity_factor=bad)


def test_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(D, 4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(D, 4, top_k=0)
