"""The defining property of each router added for issue 21: S-BASE (Clark et al. 2022), DS-MoE (Pan
et al. 2024), EvoMoE (Nie et al. 2021), LocMoE and LocMoE+ (Li et al. 2024). The generic router
invariants run over their configs in ``tests/core/test_routers.py`` and ``test_properties.py``."""

from __future__ import annotations

import math

import pytest
import torch

import core
from core.moe import MoE
from core.routers.ds_moe import DSMoERouter
from core.routers.evomoe import EvoMoERouter
from core.routers.locmoe import (
    LocMoERouter, capacity_lower_bound, local_share, max_angular_deviation, spherical_cap_fraction,
)
from core.routers.locmoe_plus import LocMoEPlusRouter
from core.routers.s_base import SBaseRouter
from core.routers.topk import TopKRouter
from core.routing import Routing

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _group_expert_counts(routing: Routing) -> torch.Tensor:
    G, S, E = routing.num_groups, routing.group_size, routing.num_experts
    key = torch.div(routing.token_idx_N, S, rounding_mode="floor") * E + routing.expert_idx_N
    return torch.bincount(key, minlength=G * E).view(G, E)


def _experts_per_token(routing: Routing) -> torch.Tensor:
    return torch.bincount(routing.token_idx_N, minlength=routing.num_groups * routing.group_size)


def _topk_like(router, top_k: int, capacity_factor) -> TopKRouter:
    """A plain top-k router (no noise, no losses) with ``router``'s gate weight."""
    ref = TopKRouter(router.dim, router.num_experts, top_k=top_k, capacity_factor=capacity_factor, noise_std=0.0)
    ref.weight.data.copy_(router.weight.data)
    return ref


# ---- S-BASE --------------------------------------------------------------------------------------

def test_s_base_gives_every_expert_s_over_e_tokens_where_topk_does_not():
    G, S, E = 3, 64, 4
    router = SBaseRouter(D, E).train()
    x = torch.randn(G, S, D) + 2.0 * router.weight[0].detach()  # every token leans to expert 0
    routing = router(x)
    assert torch.equal(_group_expert_counts(routing), torch.full((G, E), S // E))
    plan_GSE = routing.extras["plan_GSE"]  # the Sinkhorn plan's columns are S/E within its tolerance
    torch.testing.assert_close(plan_GSE.sum(1), torch.full((G, E), S / E), rtol=1e-3, atol=0)
    top1 = _topk_like(router, 1, None).train()(x)
    assert _group_expert_counts(top1)[:, 0].min() > S // 2, "the input should unbalance plain top-1"


def test_s_base_balances_the_valid_tokens_under_a_mask():
    G, S, E = 2, 30, 4
    router = SBaseRouter(D, E).train()
    mask = torch.rand(G, S) > 0.3
    routing = router(torch.randn(G, S, D), mask)
    counts_GE = _group_expert_counts(routing)
    n_valid_G1 = mask.sum(1, keepdim=True)
    assert torch.equal(counts_GE.sum(1, keepdim=True), n_valid_G1)  # every valid token routed once
    assert (counts_GE >= n_valid_G1 // E).all() and (counts_GE <= -(-n_valid_G1 // E)).all()


def test_s_base_is_greedy_top1_at_evaluation():
    router = SBaseRouter(D, 4).eval()
    x = torch.randn(2, 16, D)
    routing = router(x)
    torch.testing.assert_close(routing.expert_idx_N, (x @ router.weight.t()).argmax(-1).reshape(-1))
    assert routing.capacity is None and not router.is_causal


# ---- DS-MoE --------------------------------------------------------------------------------------

def test_ds_moe_is_dense_in_training_and_at_most_k_experts_at_evaluation():
    G, S, E, K = 2, 16, 6, 2
    router = DSMoERouter(D, E, top_k=K)
    x = torch.randn(G, S, D)
    train = router.train()(x)
    assert (_experts_per_token(train) == E).all()
    assert set(router.aux_losses) == {"mutual_information"}
    evaluation = router.eval()(x)
    per_token = _experts_per_token(evaluation)
    assert (per_token == K).all()
    top_idx = (x @ router.weight.t()).topk(K, -1).indices.reshape(G * S, K)
    chosen = torch.zeros(G * S, E, dtype=torch.bool)
    chosen[evaluation.token_idx_N, evaluation.expert_idx_N] = True
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter(1, top_idx, True))


def test_ds_moe_threshold_keeps_fewer_experts_above_the_threshold():
    E, K, thr = 8, 3, 0.2
    router = DSMoERouter(D, E, top_k=K, threshold=thr).eval()
    routing = router(torch.randn(4, 16, D))
    per_token = _experts_per_token(routing)
    assert (per_token >= 1).all() and (per_token <= K).all() and (per_token < K).any()
    gates = routing.scores_GSE.reshape(-1, E)[routing.token_idx_N, routing.expert_idx_N]
    top1 = routing.scores_GSE.reshape(-1, E).max(-1).values[routing.token_idx_N]
    assert ((gates >= thr) | (gates == top1)).all()


# ---- EvoMoE --------------------------------------------------------------------------------------

def test_evomoe_is_dense_at_the_start_and_exactly_topk_at_the_end_of_its_schedule():
    G, S, E, K, steps = 2, 32, 4, 2, 5
    router = EvoMoERouter(D, E, top_k=K, capacity_factor=1.05, anneal_steps=steps).train()
    x = torch.randn(G, S, D)
    assert (_experts_per_token(router(x)) == E).all(), "step 0 must use every expert"
    eval_counts = []
    for _ in range(steps):
        eval_counts.append(_experts_per_token(router.eval()(x)).float().mean().item())
        core.after_optimizer_step(router)
    assert int(router.step) == steps and router.annealed
    assert eval_counts == sorted(eval_counts, reverse=True) and eval_counts[-1] < eval_counts[0]
    ref = _topk_like(router, K, 1.05)
    for mode in (True, False):
        a, b = router.train(mode)(x), ref.train(mode)(x)
        for u, v in ((a.token_idx_N, b.token_idx_N), (a.expert_idx_N, b.expert_idx_N), (a.weight_N, b.weight_N)):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
        assert a.capacity == b.capacity


def test_evomoe_step_follows_the_engine_hook_and_the_checkpoint():
    layer = MoE(D, 32, num_experts=4, router=lambda dim, num_experts: EvoMoERouter(dim, num_experts, anneal_steps=3))
    for _ in range(2):
        core.after_optimizer_step(layer)
    state = layer.state_dict()
    assert int(layer.router.step) == 2 and int(state["router.step"]) == 2
    assert layer.router.temperature() == pytest.approx(2.0 * (0.3 / 2.0) ** (2 / 3))


# ---- LocMoE --------------------------------------------------------------------------------------

def test_locmoe_sends_more_assignments_to_the_tokens_own_rank_than_topk():
    G, S, E = 8, 32, 8
    router = LocMoERouter(D, E, top_k=2, num_ranks=2, local_bias=0.1).eval()
    x = torch.randn(G, S, D)
    loc = router(x)
    local_SE = loc.extras["local_SE"]  # position s lives on rank s mod 2, which hosts half the experts
    assert torch.equal(local_SE[0], torch.arange(E) < E // 2) and torch.equal(local_SE[1], torch.arange(E) >= E // 2)
    ref = _topk_like(router, 2, None).eval()(x)
    share_loc, share_ref = local_share(loc, local_SE), local_share(ref, local_SE)
    assert share_loc > share_ref + 0.05, (share_loc, share_ref)
    unbiased = LocMoERouter(D, E, top_k=2, num_ranks=2, local_bias=0.0).eval()
    unbiased.weight.data.copy_(router.weight.data)
    torch.testing.assert_close(unbiased(x).expert_idx_N, ref.expert_idx_N)  # β = 0 is plain top-k


def test_locmoe_locality_loss_pulls_gate_mass_to_local_experts():
    router = LocMoERouter(D, 4, num_ranks=2, switch_loss_weight=0.0, locality_loss_weight=1.0).train()
    x = torch.randn(4, 16, D)
    x[..., 0] = 2.0 * (1 - 2 * (torch.arange(16) % 2))  # a position feature: the home rank is learnable
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    local_SE = router.local_experts(16, x.device)

    def local_mass():
        with torch.no_grad():
            p = torch.softmax(x @ router.weight.t(), -1)
            return (p * local_SE).sum(-1).mean().item()

    before = local_mass()
    for _ in range(30):
        router(x)
        opt.zero_grad()
        router.aux_losses["locality"].backward()
        opt.step()
    assert local_mass() > before + 0.1


def test_locmoe_capacity_bound_is_the_spherical_cap_formula_on_known_vectors():
    # D = 3: a cap of angular radius δ holds (1 − cos δ)/2 of the sphere; D = 2: an arc of δ/π
    gate_ED = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    x_TD = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 1.0]])
    delta = max_angular_deviation(x_TD, gate_ED, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]))
    assert delta.item() == pytest.approx(math.pi / 4, abs=1e-6)
    assert spherical_cap_fraction(3, math.pi / 4) == pytest.approx((1 - math.cos(math.pi / 4)) / 2, abs=1e-12)
    assert capacity_lower_bound(100, 3, delta.item()) == 15  # ⌈100 · 0.14645⌉
    assert spherical_cap_fraction(3, 2 * math.pi / 3) == pytest.approx(0.75, abs=1e-12)  # δ > π/2
    assert spherical_cap_fraction(2, math.pi / 3) == pytest.approx(1 / 3, abs=1e-12)
    assert capacity_lower_bound(30, 2, math.pi / 3) == 10
    assert spherical_cap_fraction(16, math.pi / 2) == pytest.approx(0.5, abs=1e-12)
    assert spherical_cap_fraction(16, math.pi) == 1.0 and spherical_cap_fraction(16, 0.0) == 0.0


def test_spherical_cap_fraction_matches_uniform_directions():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(200_000, 8, generator=g), dim=-1)
    angle = torch.arccos(u[:, 0].clamp(-1, 1))
    for delta in (0.6, 1.2, 2.0):
        assert (angle <= delta).float().mean().item() == pytest.approx(spherical_cap_fraction(8, delta), abs=5e-3)


# ---- LocMoE+ -------------------------------------------------------------------------------------

def test_locmoe_plus_gives_fewer_tokens_per_expert_than_topk():
    G, S, E = 4, 64, 4
    router = LocMoEPlusRouter(D, E, top_k=2, capacity_factor=1.05).train()
    x = torch.randn(G, S, D)
    plus = router(x)
    ref = _topk_like(router, 2, 1.05).train()(x)
    assert plus.tokens_per_expert().float().mean() < 0.9 * ref.tokens_per_expert().float().mean()
    assert _group_expert_counts(plus).max() <= router.capacity(S) <= ref.capacity
    aff = torch.nn.functional.cosine_similarity(x.reshape(-1, 1, D), router.weight[None].detach(), dim=-1)
    assert (aff[plus.token_idx_N, plus.expert_idx_N] >= 0).all()  # no expert gets a token pointing away


def test_locmoe_plus_experts_keep_their_highest_affinity_candidates():
    E, S = 4, 64
    router = LocMoEPlusRouter(D, E, top_k=1, affinity_threshold=-1.0, min_capacity=4).eval()
    router.angle_estimate.fill_(0.3)  # a small deviation: the bound is below the candidates' count
    x = torch.randn(1, S, D)
    routing = router(x)
    C = router.capacity(S)
    assert C == 4
    aff = torch.nn.functional.cosine_similarity(x.reshape(-1, 1, D), router.weight[None].detach(), dim=-1)
    best = aff.argmax(-1)
    for e in range(E):
        candidates = (best == e).nonzero().squeeze(1)
        kept = routing.token_idx_N[routing.expert_idx_N == e]
        expect = candidates[aff[candidates, e].topk(min(C, candidates.numel())).indices]
        assert set(kept.tolist()) == set(expect.tolist())  # by affinity, not by position


def test_locmoe_plus_capacity_falls_as_tokens_gather_around_their_experts():
    E, S = 4, 64
    router = LocMoEPlusRouter(D, E, top_k=1).train()
    first = router.capacity(S)
    owner = torch.randint(0, E, (2, S))
    x = router.weight.detach()[owner] + 0.05 * torch.randn(2, S, D)  # tokens close to one gate vector
    for _ in range(10):
        router(x)
        core.after_optimizer_step(router)
    assert router.angle_estimate.item() < 0.5 * math.pi / 2
    assert router.capacity(S) < first
