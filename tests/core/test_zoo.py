"""The defining property of every router of the zoo (docs/routers.md §4), LoRA experts, fine-grained
sizing and the losses added for them. The generic invariants (weights, indices, capacity, masks,
gradients, layer = dense formulation) run over every config in tests/core/test_routers.py and
test_moe.py; here each router's own rule is checked against its formula."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import timm.layers
import torch
from torch import nn

import core
from core import losses
from core.experts import Experts
from core.lora_experts import LoRAExperts, fine_grained_experts
from core.moe import MoE
from core.routers.adamoe import AdaMoERouter
from core.routers.base_layer import BaseLayerRouter, balanced_assignment
from core.routers.deepseek import DeepSeekRouter
from core.routers.dselect_k import DSelectKRouter, smooth_step
from core.routers.gshard import GShardRouter
from core.routers.hash import HashRouter
from core.routers.hierarchical import HierarchicalRouter
from core.routers.lory import LoryRouter
from core.routers.sentence import SentenceRouter
from core.routers.smear import SmearRouter
from core.routers.switch import SwitchRouter
from core.routers.xmoe import XMoERouter

D, F = 16, 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _per_token(routing, values_N=None) -> torch.Tensor:
    """Sum over each token's assignments of ``values_N`` (default: count them)."""
    v = torch.ones_like(routing.weight_N) if values_N is None else values_N
    return torch.zeros(routing.num_tokens, dtype=v.dtype).index_add_(0, routing.token_idx_N, v)


# ---- Switch, Mixtral ------------------------------------------------------------------------------

def test_switch_is_top1_with_capacity_and_switch_loss():
    router = SwitchRouter(D, 4, capacity_factor=1.0).train()
    x = torch.randn(2, 32, D)
    routing = router(x)
    assert routing.capacity == math.ceil(32 * 1.0 / 4)
    assert (_per_token(routing) <= 1).all()
    probs = torch.softmax(x @ router.weight.t(), -1)
    torch.testing.assert_close(routing.weight_N, probs.reshape(-1, 4)[routing.token_idx_N, routing.expert_idx_N])
    torch.testing.assert_close(routing.expert_idx_N, probs.reshape(-1, 4).argmax(-1)[routing.token_idx_N])
    expected = 1e-2 * losses.switch_loss(probs, probs.argmax(-1, keepdim=True))
    torch.testing.assert_close(router.aux_losses["switch"], expected)


def test_mixtral_config_renormalises_top2_dropless(make_router):
    router = make_router("mixtral")(dim=D, num_experts=8).train()
    routing = router(torch.randn(2, 16, D))
    assert routing.capacity is None and routing.num_kept == 2 * 16 * 2
    torch.testing.assert_close(_per_token(routing, routing.weight_N), torch.ones(32))
    assert set(router.aux_losses) == {"switch"}


# ---- GShard ---------------------------------------------------------------------------------------

def test_gshard_keeps_second_expert_with_probability_2g2():
    E, S = 8, 20000
    router = GShardRouter(D, E, capacity_factor=None, gshard_loss_weight=0.0).train()
    x = torch.randn(1, S, D) * 2  # logits of order 2: 2·g2 spreads over [0, 1]
    routing = router(x)
    top = torch.softmax(x[0] @ router.weight.detach().t(), -1).topk(2, -1).values
    p_keep = (2 * top[:, 1] / top.sum(-1))  # = 2·g2 after normalisation, in [0, 1]
    kept2 = _per_token(routing) == 2
    assert (_per_token(routing) >= 1).all()
    # total: binomial count within 4 standard deviations of its mean
    mean, std = p_keep.sum(), (p_keep * (1 - p_keep)).sum().sqrt()
    assert abs(float(kept2.sum()) - float(mean.detach())) < 4 * float(std.detach())
    # calibration: in each band of 2·g2 the keep frequency matches the band's mean probability
    for lo, hi in [(0.0, 0.4), (0.4, 0.7), (0.7, 1.01)]:
        band = (p_keep >= lo) & (p_keep < hi)
        assert band.sum() > 500
        freq, expect = kept2[band].double().mean(), p_keep[band].double().mean()
        assert abs(float(freq - expect)) < 4 * math.sqrt(float(expect * (1 - expect)) / int(band.sum())) + 1e-3
    # gates: the two normalised gates; a lone first choice keeps g1/(g1+g2)
    per_token_gate = _per_token(routing, routing.weight_N)
    torch.testing.assert_close(per_token_gate[kept2], torch.ones(int(kept2.sum())))
    torch.testing.assert_close(per_token_gate[~kept2], (top[:, 0] / top.sum(-1))[~kept2])
    # a skipped second choice is no choice: nothing counts as dropped
    assert int(routing.num_dropped) == 0


def test_gshard_eval_rule_and_capacity():
    x = torch.randn(1, 64, D)
    always = GShardRouter(D, 8, eval_second_expert="always").eval()
    assert (_per_token(always(x)) == 2).all() or always(x).capacity is not None
    r = GShardRouter(D, 8, capacity_factor=None, eval_second_expert="threshold").eval()
    top = torch.softmax(x[0] @ r.weight.t(), -1).topk(2, -1).values
    torch.testing.assert_close(_per_token(r(x)) == 2, 2 * top[:, 1] / top.sum(-1) > 0.5)
    assert GShardRouter(D, 8, capacity_factor=1.0).capacity(64) == 2 * 64 // 8
    routing = GShardRouter(D, 8, capacity_factor=None).eval()(x)
    assert routing.num_kept == 128 and r(x).num_kept <= 128


# ---- DeepSeek -------------------------------------------------------------------------------------

def _load_cv2(counts: torch.Tensor) -> float:
    counts = counts.double()
    return float(counts.var(correction=0) / counts.mean() ** 2)


def test_deepseek_bias_moves_toward_balance_and_gets_no_gradient():
    E = 8
    layer = MoE(D, F, num_experts=E, router=functools.partial(DeepSeekRouter, top_k=2, bias_update_rate=0.01)).train()
    router = layer.router
    # skewed input: every token shares one strong direction, so a few experts win most tokens
    direction = torch.randn(D)
    x = torch.randn(4, 64, D) + 1.5 * direction
    cv2 = []
    for _ in range(60):  # the router alone: a training forward counts the load, the step updates b
        with torch.no_grad():
            cv2.append(_load_cv2(router(x).tokens_per_expert()))
        core.after_optimizer_step(layer)
    layer(x).square().mean().backward()  # a training step through the layer leaves the bias alone
    core.after_optimizer_step(layer)
    assert cv2[0] > 0.5, "the input should start unbalanced"
    assert max(cv2[-10:]) < 0.2 * cv2[0], (cv2[0], cv2[-10:])
    bias = router.expert_bias_E
    assert not bias.requires_grad and bias.grad is None
    assert all(p is not bias for p in router.parameters())
    assert "expert_bias_E" in router.state_dict() and "pending_load_E" not in router.state_dict()
    assert bias.abs().sum() > 0 and float(router.pending_load_E.sum()) == 0.0
    # the bias survives a checkpoint round trip and stays float32 when the model is cast
    other = DeepSeekRouter(D, E)
    other.load_state_dict(router.state_dict())
    torch.testing.assert_close(other.expert_bias_E, bias)
    other.to(torch.bfloat16)
    assert other.expert_bias_E.dtype == torch.float32 and other.weight.dtype == torch.bfloat16
    torch.testing.assert_close(other.expert_bias_E, bias)


def test_deepseek_gates_are_unbiased_scores_normalised_times_route_scale():
    router = DeepSeekRouter(D, 8, top_k=3, route_scale=2.5).eval()
    router.expert_bias_E.copy_(torch.linspace(-1, 1, 8))
    x = torch.randn(1, 32, D)
    routing = router(x)
    s = torch.sigmoid(x[0] @ router.weight.t())
    chosen = (s + router.expert_bias_E).topk(3, -1).indices  # selection uses the bias ...
    torch.testing.assert_close(torch.sort(routing.expert_idx_N.view(3, 32).t(), -1).values,
                               torch.sort(chosen, -1).values)
    expected = 2.5 * s.gather(-1, chosen) / s.gather(-1, chosen).sum(-1, keepdim=True)  # ... the gate does not
    got = torch.zeros(32, 8).index_put((routing.token_idx_N, routing.expert_idx_N), routing.weight_N)
    torch.testing.assert_close(got.gather(-1, chosen), expected)


def test_deepseek_group_limited_selection():
    router = DeepSeekRouter(D, 16, top_k=4, n_group=4, topk_group=2).eval()
    routing = router(torch.randn(2, 32, D))
    groups = torch.zeros(64, 4, dtype=torch.bool)
    groups[routing.token_idx_N, routing.expert_idx_N // 4] = True
    assert (groups.sum(-1) <= 2).all()
    with pytest.raises(ValueError, match="n_group"):
        DeepSeekRouter(D, 10, n_group=4)


# ---- AdaMoE ---------------------------------------------------------------------------------------

def test_adamoe_null_experts_reduce_true_experts_and_output_zero():
    E, m, K = 4, 8, 4
    layer = MoE(D, F, num_experts=E, router=functools.partial(AdaMoERouter, num_null_experts=m, top_k=K)).eval()
    layer.keep_last_routing = True
    router = layer.router
    x = torch.randn(2, 64, D)
    with torch.no_grad():
        # token (0, 0) strongly prefers every null expert over every true expert
        v = x[0, 0] / x[0, 0].norm()
        router.weight[:E] -= 20 * v
        router.weight[E:] += 20 * v
        y = layer(x)
    routing = layer.last_routing
    per_token = _per_token(routing)
    assert per_token[0] == 0
    assert torch.equal(y[0, 0], torch.zeros(D)), "an all-null token must output exactly 0"
    mean_true = float(routing.extras["true_experts_per_token"])
    assert mean_true < K and mean_true == pytest.approx(float(per_token.mean()))
    assert routing.num_experts == E and routing.expert_idx_N.max() < E
    # gates renormalised over the selected true experts
    has = per_token > 0
    torch.testing.assert_close(_per_token(routing, routing.weight_N)[has], torch.ones(int(has.sum())))
    # the true experts kept are exactly the true experts among the top-K of all n + m
    probs = torch.softmax(x.reshape(-1, D) @ router.weight.t(), -1)
    chosen = torch.zeros(128, E + m, dtype=torch.bool).scatter(-1, probs.topk(K, -1).indices, True)[:, :E]
    got = torch.zeros(128, E, dtype=torch.bool)
    got[routing.token_idx_N, routing.expert_idx_N] = True
    assert torch.equal(got, chosen)
    # no FLOPs for nulls: the experts ran on as many rows as there are true assignments
    assert layer.stat_tokens_E.sum() == routing.num_kept < 128 * K


def test_null_aware_switch_loss():
    probs = torch.softmax(torch.randn(1, 6, 5), -1)  # 3 true + 2 null
    a = torch.tensor([[[0, 3], [1, 3], [2, 3], [0, 3], [1, 3], [2, 3]]])  # all null picks on null 3
    b = torch.tensor([[[0, 3], [1, 4], [2, 3], [0, 4], [1, 3], [2, 4]]])  # the same, spread over 3 and 4
    la, lb = (losses.null_aware_switch_loss(probs, idx, num_null=2) for idx in (a, b))
    torch.testing.assert_close(la, lb)  # only the total null load counts
    assert not torch.allclose(losses.switch_loss(probs, a), losses.switch_loss(probs, b))
    # by hand: f_true = counts/(S·K), null f = mean of the null f's, X·Σ f P
    f = torch.tensor([2, 2, 2, 6, 0]) / 12.0
    f[3:] = f[3:].mean()
    torch.testing.assert_close(la, 5 * (f * probs[0].mean(0)).sum())
    uniform = torch.full((1, 10, 5), 0.2)
    idx = torch.arange(10)[None, :, None] % 5
    torch.testing.assert_close(losses.null_aware_switch_loss(uniform, idx, 2), torch.tensor(1.0))


# ---- BASE -----------------------------------------------------------------------------------------

def test_base_gives_every_expert_exactly_s_over_e_tokens_in_training():
    G, S, E = 3, 32, 4
    router = BaseLayerRouter(D, E).train()
    routing = router(torch.randn(G, S, D) + torch.randn(D))  # skewed: greedy would pile onto one expert
    group = routing.token_idx_N // S
    counts = torch.bincount(group * E + routing.expert_idx_N, minlength=G * E)
    assert torch.equal(counts, torch.full((G * E,), S // E))
    assert torch.equal(_per_token(routing), torch.ones(G * S))
    with pytest.raises(ValueError, match="must be a multiple of num_experts"):
        router(torch.randn(1, 30, D))


def test_base_assignment_is_optimal_and_eval_is_greedy():
    aff = torch.randn(6, 3)
    best = max(sum(float(aff[s, e]) for s, e in enumerate(assign))
               for assign in itertools.permutations([0, 0, 1, 1, 2, 2]))
    got = balanced_assignment(aff, 2)
    assert torch.equal(torch.bincount(got, minlength=3), torch.full((3,), 2))
    assert float(aff[torch.arange(6), got].sum()) == pytest.approx(best)
    router = BaseLayerRouter(D, 4).eval()
    x = torch.randn(2, 16, D)
    routing = router(x)
    torch.testing.assert_close(routing.expert_idx_N, (x @ router.centroids_ED.t()).reshape(-1, 4).argmax(-1))


def test_base_output_mixes_expert_and_input():
    layer = MoE(D, F, num_experts=4, router=BaseLayerRouter).train()
    layer.keep_last_routing = True
    x = torch.randn(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        y = layer(x, mask=mask)
    routing = layer.last_routing
    x_TD = x.reshape(-1, D)
    expected = torch.zeros(16, D)
    for t, e in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()):
        s = torch.sigmoid(x_TD[t] @ layer.router.centroids_ED[e])
        expected[t] = s * layer.experts.forward_expert(e, x_TD[t:t + 1])[0] + (1 - s) * x_TD[t]
    torch.testing.assert_close(y.reshape(-1, D), expected)
    assert (y[1, 5:] == 0).all()  # padding: no expert, no residual mix


# ---- hash -----------------------------------------------------------------------------------------

def test_hash_routing_is_a_pure_function_of_token_ids():
    router = HashRouter(D, 8).train()
    ids = torch.randint(0, 1000, (3, 40))
    a, b = router(torch.randn(3, 40, D), token_ids_GS=ids), router(torch.randn(3, 40, D), token_ids_GS=ids)
    assert torch.equal(a.expert_idx_N, b.expert_idx_N) and torch.equal(a.token_idx_N, b.token_idx_N)
    torch.testing.assert_close(a.expert_idx_N, router.expert_of(ids.reshape(-1)))
    # the same id goes to the same expert wherever it occurs; another seed is another map
    many = torch.arange(20000)
    assert torch.equal(router.expert_of(many), HashRouter(D, 8).expert_of(many))
    assert not torch.equal(router.expert_of(many), HashRouter(D, 8, seed=1).expert_of(many))
    counts = torch.bincount(router.expert_of(many), minlength=8).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.1
    assert list(router.parameters()) == [] and router.aux_losses == {} and router.is_causal
    with pytest.raises(ValueError, match="hash routing needs token ids"):
        router(torch.randn(1, 4, D))
    with pytest.raises(ValueError, match="hash routing needs token ids"):
        MoE(D, F, num_experts=8, router=HashRouter)(torch.randn(1, 4, D))


# ---- DSelect-k ------------------------------------------------------------------------------------

def test_dselect_k_smooth_step_matches_its_formula():
    gamma = 2.0
    t = torch.linspace(-2, 2, 401, dtype=torch.float64)
    expected = torch.tensor([0.0 if v <= -gamma / 2 else 1.0 if v >= gamma / 2
                             else -2 * v**3 / gamma**3 + 3 * v / (2 * gamma) + 0.5 for v in t.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(smooth_step(t, gamma), expected)
    assert float(smooth_step(torch.tensor(0.0), gamma)) == 0.5
    assert (smooth_step(t, gamma).diff() >= 0).all()
    # C¹ at the knots: the cubic reaches 0/1 with zero slope
    knot = torch.tensor([-gamma / 2 + 1e-4, gamma / 2 - 1e-4], dtype=torch.float64, requires_grad=True)
    smooth_step(knot, gamma).sum().backward()
    assert knot.grad.abs().max() < 1e-3


def test_dselect_k_selects_exactly_k_experts_once_converged():
    E, K, gamma = 8, 3, 1.0
    router = DSelectKRouter(D, E, top_k=K, gamma=gamma).eval()
    x = torch.randn(2, 10, D)
    # at initialisation every selector is near S = 1/2: the gate is dense and sums to 1
    dense = router(x)
    assert (_per_token(dense) == E).all()
    torch.testing.assert_close(_per_token(dense, dense.weight_N), torch.ones(20))
    targets = [5, 2, 6]
    with torch.no_grad():
        router.code_weight.zero_()
        for i, e in enumerate(targets):  # saturate selector i on the binary code of expert e
            for j in range(router.num_bits):
                router.code_bias[i * router.num_bits + j] = gamma if (e >> j) & 1 else -gamma
    routing = router(x)
    assert (_per_token(routing) == K).all()
    w = torch.softmax(x.reshape(-1, D) @ router.selector_weight.t() + router.selector_bias, -1)
    got = torch.zeros(20, E).index_put((routing.token_idx_N, routing.expert_idx_N), routing.weight_N)
    torch.testing.assert_close(got[:, targets], w)
    assert got[:, [e for e in range(E) if e not in targets]].abs().max() == 0


def test_dselect_k_regularisers():
    router = DSelectKRouter(D, 5, top_k=2, entropy_weight=0.1).train()
    router(torch.randn(2, 6, D))
    assert set(router.aux_losses) == {"selector_entropy", "invalid_code"}  # 5 is not a power of 2
    assert router.aux_losses["invalid_code"] >= 0.01 * 2  # ≥ 1 per selector, times the weight
    router = DSelectKRouter(D, 4, top_k=2).train()
    router(torch.randn(2, 6, D))
    assert router.aux_losses == {}


# ---- sentence, hierarchical, X-MoE ----------------------------------------------------------------

def test_sentence_routes_whole_sequence_by_its_masked_mean():
    router = SentenceRouter(D, 8, top_k=2).eval()
    x = torch.randn(3, 12, D)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    a = router(x, mask)
    x2 = x.clone()
    x2[1, 7:] = 100 * torch.randn(5, D)  # padding must not move the routing
    b = router(x2, mask)
    assert torch.equal(a.expert_idx_N, b.expert_idx_N)
    experts = torch.zeros(36, 8, dtype=torch.bool)
    experts[a.token_idx_N, a.expert_idx_N] = True
    for g in range(3):
        rows = experts[g * 12:(g + 1) * 12][mask[g]]
        assert (rows == rows[0]).all() and rows[0].sum() == 2
    mean1 = x[1, :7].mean(0)
    torch.testing.assert_close(experts[12], torch.zeros(8, dtype=torch.bool).index_fill(
        0, (mean1 @ router.weight.t()).topk(2).indices, True))
    assert not router.is_causal


def test_hierarchical_gates_are_products_of_the_two_levels():
    router = HierarchicalRouter(D, 8, num_expert_groups=2, top_groups=1, top_k=2).eval()
    x = torch.randn(1, 20, D)
    routing = router(x)
    p1 = torch.softmax(x[0] @ router.group_weight.t(), -1)
    p2 = torch.softmax((x[0] @ router.weight.t()).view(20, 2, 4), -1)
    assert (_per_token(routing) == 2).all()
    grp = routing.expert_idx_N // 4
    torch.testing.assert_close(grp, p1.argmax(-1)[routing.token_idx_N])
    expected = p1[routing.token_idx_N, grp] * p2[routing.token_idx_N, grp, routing.expert_idx_N % 4]
    torch.testing.assert_close(routing.weight_N, expected)
    inner_top2 = p2[routing.token_idx_N, grp].topk(2, -1).indices
    assert ((inner_top2 == (routing.expert_idx_N % 4)[:, None]).any(-1)).all()


def test_xmoe_is_cosine_routing_with_learnable_temperature():
    router = XMoERouter(D, 8, top_k=1, temperature_init=0.25).train()
    x = torch.randn(2, 16, D)
    a = router(x)
    b = router(3.0 * x)  # cosine scores: the token's norm does not matter
    assert torch.equal(a.expert_idx_N, b.expert_idx_N)
    torch.testing.assert_close(a.weight_N, b.weight_N)
    h = nn.functional.normalize(x @ router.proj_RD.t(), dim=-1)
    cos = h @ nn.functional.normalize(router.expert_emb_ER, dim=-1).t()
    probs = torch.softmax(cos / 0.25, -1).reshape(-1, 8)
    torch.testing.assert_close(a.weight_N, probs[a.token_idx_N, a.expert_idx_N])
    assert router.proj_RD.shape == (16, D)
    (a.weight_N.sum() + router.aux_losses["switch"]).backward()
    assert router.logit_scale.grad is not None and router.logit_scale.grad != 0


# ---- SMEAR, Lory ----------------------------------------------------------------------------------

def test_smear_merged_ffn_equals_weighted_sum_of_expert_parameters():
    E = 4
    layer = MoE(D, F, num_experts=E, router=SmearRouter).eval()
    layer.keep_last_routing = True
    x = torch.randn(3, 10, D)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 6:] = False
    with torch.no_grad():
        y = layer(x, mask=mask)
    merge = layer.last_routing.merge_GE
    for g in range(3):
        mean = x[g][mask[g]].mean(0)
        torch.testing.assert_close(merge[g], torch.softmax(layer.router.weight @ mean, -1))
        merged = Experts(1, D, F)
        ex = layer.experts
        with torch.no_grad():  # θ̄ = Σ_e p_e θ_e, parameter by parameter
            for name in ("w1_EDF", "w2_EFO", "b1_EF", "b2_EO"):
                getattr(merged, name).copy_(torch.einsum("e,e...->...", merge[g], getattr(ex, name))[None])
            expected = merged.forward_expert(0, x[g]) * mask[g, :, None]  # padding gets 0 from the experts
            torch.testing.assert_close(y[g], expected)


def test_lory_segment_weights_come_from_the_previous_segment():
    E, seg, per_seq = 4, 8, 3
    router = LoryRouter(D, E, segments_per_sequence=per_seq).eval()
    layer = MoE(D, F, num_experts=E, router=router, group_size=seg).eval()
    layer.keep_last_routing = True
    x = torch.randn(2, seg * per_seq, D)
    with torch.no_grad():
        y = layer(x)
    merge = layer.last_routing.merge_GE.view(2, per_seq, E)
    torch.testing.assert_close(merge[:, 0], torch.full((2, E), 1 / E))  # first segments: uniform
    for k in range(1, per_seq):
        prev = x[:, (k - 1) * seg:k * seg].mean(1)
        torch.testing.assert_close(merge[:, k], torch.softmax(prev @ router.weight.t(), -1))
    # causal: changing the last segment changes no output before it
    x2 = x.clone()
    x2[:, -seg:] = torch.randn(2, seg, D)
    with torch.no_grad():
        y2 = layer(x2)
    torch.testing.assert_close(y2[:, :-seg], y[:, :-seg])
    assert router.is_causal and not LoryRouter(D, E, first_segment="self").is_causal


# ---- LoRA experts, fine-grained experts -----------------------------------------------------------

@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_lora_experts_with_zero_deltas_equal_the_base_ffn(glu):
    E = 4
    if glu:
        mlp = timm.layers.SwiGLU(D, F, bias=False)  # the GLU form has no bias on the value branch
        lora = LoRAExperts(E, D, F, act_layer=nn.SiLU, glu=True, bias=False)
        lora.load_dense_mlp(mlp.fc1_g, mlp.fc2, mlp.fc1_x)  # act(x W1) ⊙ x W3: W1 is timm's gate branch
    else:
        mlp = timm.layers.Mlp(D, F)
        lora = LoRAExperts(E, D, F)
        lora.load_dense_mlp(mlp.fc1, mlp.fc2)
    x = torch.randn(20, D)
    counts = torch.tensor([5, 0, 9, 6])
    expert_idx = torch.repeat_interleave(torch.arange(E), counts)
    with torch.no_grad():
        expected = mlp(x)
        torch.testing.assert_close(lora(x, counts, expert_idx), expected)
        torch.testing.assert_close(lora.forward_loop(x, counts), expected)
        torch.testing.assert_close(lora.forward_batched(x.view(4, 5, D)), expected.view(4, 5, D))
    assert not any(p.requires_grad for p in lora.base.parameters())


def test_lora_experts_paths_agree_and_train_only_the_deltas():
    E, R = 4, 8
    lora = LoRAExperts(E, D, F, rank=R, alpha=8.0)
    with torch.no_grad():
        for b in (lora.b1_ERF, lora.b2_ERO):
            b.normal_()
    counts = torch.tensor([3, 5, 0, 4])
    x = torch.randn(12, D)
    idx = torch.repeat_interleave(torch.arange(E), counts)
    y = lora(x, counts, idx)
    torch.testing.assert_close(y, lora.forward_loop(x, counts), rtol=1e-4, atol=1e-5)
    y_e = torch.stack([lora.forward_expert(e, x[:3]) for e in range(E)])
    torch.testing.assert_close(lora.forward_batched(x[:3].expand(E, 3, D).contiguous()), y_e, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y_e[0], y_e[1])  # the deltas make the experts differ
    y.sum().backward()
    assert lora.a1_EDR.grad is not None and lora.b2_ERO.grad.abs().sum() > 0
    assert lora.base.w1_EDF.grad is None
    # merging: Σ_e m_e θ_e with θ_e = W + (α/r) A_e B_e
    m = torch.softmax(torch.randn(2, E), -1)
    xg = torch.randn(2, 5, D)
    with torch.no_grad():
        got = lora.forward_merged(xg, m)
        for g in range(2):
            w1 = sum(m[g, e] * lora.expert_weights(e)["w1"] for e in range(E))
            w2 = sum(m[g, e] * lora.expert_weights(e)["w2"] for e in range(E))
            b = lora.base
            ref = b.act(xg[g] @ w1 + b.b1_EF[0]) @ w2 + b.b2_EO[0]
            torch.testing.assert_close(got[g], ref, rtol=1e-4, atol=1e-5)


def test_lora_experts_inside_the_moe_layer():
    layer = MoE(D, F, num_experts=4, router=functools.partial(
        __import__("core.routers.topk", fromlist=["TopKRouter"]).TopKRouter, top_k=2, capacity_factor=None,
        renormalize=True, noise_std=0.0))
    base = timm.layers.Mlp(D, F)
    layer.experts = LoRAExperts(4, D, F)
    layer.experts.load_dense_mlp(base.fc1, base.fc2)
    x = torch.randn(2, 6, D)
    with torch.no_grad():  # zero deltas, renormalised gates: the layer is the base FFN
        torch.testing.assert_close(layer(x), base(x))


def test_fine_grained_experts_keep_width_and_active_compute():
    cfg = fine_grained_experts(num_experts=8, hidden_features=1024, granularity=4, top_k=2, num_shared_experts=1)
    assert cfg == {"num_experts": 31, "hidden_features": 256, "top_k": 7, "num_shared_experts": 1}
    # total and active hidden width are unchanged (shared + routed)
    assert (cfg["num_experts"] + cfg["num_shared_experts"]) * cfg["hidden_features"] == 8 * 1024
    assert (cfg["top_k"] + cfg["num_shared_experts"]) * cfg["hidden_features"] == 2 * 1024
    with pytest.raises(ValueError, match="granularity"):
        fine_grained_experts(8, 1000, 3, 2)


# ---- per-modality entropy losses ------------------------------------------------------------------

def test_modality_entropy_losses_match_per_modality_masks():
    probs = torch.softmax(torch.randn(2, 10, 4), -1)
    modality = torch.randint(0, 2, (2, 10))
    modality[1] = 0  # group 1 holds no token of modality 1
    out = losses.modality_entropy_losses(probs, modality, 2, thresholds=[None, math.log(2)])
    for m in (0, 1):
        sel = modality == m
        keep = sel.any(1)
        torch.testing.assert_close(out[f"local_{m}"], losses.local_entropy_loss(probs[keep], sel[keep]))
    torch.testing.assert_close(out["global_1"], losses.global_entropy_loss(probs[:1], modality[:1] == 1, math.log(2)))
    assert set(losses.modality_entropy_losses(probs, torch.zeros(2, 10, dtype=torch.long), 2)) == {"local_0", "global_0"}


# ---- on a GPU -------------------------------------------------------------------------------------

ZOO = ["switch", "gshard", "mixtral", "deepseek", "adamoe", "xmoe", "base", "hash", "dselect_k", "sentence",
       "smear", "lory", "hierarchical"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ZOO)
def test_zoo_router_on_cuda_matches_cpu(name, make_router):
    import copy
    layer = MoE(D, F, num_experts=8, router=make_router(name)).eval()
    layer.keep_last_routing = True
    gpu = copy.deepcopy(layer).cuda()
    x = torch.randn(4, 16, D)
    ids = torch.randint(0, 50, (4, 16))
    mask = torch.rand(4, 16) > 0.2
    with torch.no_grad():
        y = layer(x, mask=mask, token_ids=ids)
        y_gpu = gpu(x.cuda(), mask=mask.cuda(), token_ids=ids.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y, rtol=1e-3, atol=1e-4)
    gpu.train()
    y = gpu(x.cuda(), mask=mask.cuda(), token_ids=ids.cuda())
    (y.square().mean() + core.collect_aux_loss(gpu)).backward()
    core.after_optimizer_step(gpu)
    assert torch.isfinite(y).all()
    for n, p in gpu.router.named_parameters():
        assert p.grad is not None and p.grad.is_cuda, n
    for n, b in gpu.router.named_buffers():
        assert b.is_cuda, n


@pytest.mark.gpu
@needs_cuda
def test_lora_experts_grouped_on_cuda_match_loop():
    lora = LoRAExperts(4, D, F, rank=8).cuda()
    with torch.no_grad():
        lora.b1_ERF.normal_()
        lora.b2_ERO.normal_()
    counts = torch.tensor([5, 0, 9, 6], device="cuda")
    x = torch.randn(20, D, device="cuda", requires_grad=True)
    idx = torch.repeat_interleave(torch.arange(4, device="cuda"), counts)
    y = lora(x, counts, idx)
    torch.testing.assert_close(y, lora.forward_loop(x, counts), rtol=1e-3, atol=1e-4)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and lora.a1_EDR.grad is not None


def test_moe_takes_an_experts_factory():
    """``MoE(experts=...)`` builds LoRA experts in place of stacked experts; zero deltas keep the
    layer equal to the same layer with the base FFN copied into stacked experts."""
    import functools

    from core.lora_experts import LoRAExperts
    from core.moe import MoE
    from core.routers.topk import TopKRouter

    torch.manual_seed(0)
    router = functools.partial(TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0, renormalize=True)
    lora = MoE(16, 32, num_experts=4, router=router, experts=functools.partial(LoRAExperts, rank=2)).eval()
    assert isinstance(lora.experts, LoRAExperts)
    plain = MoE(16, 32, num_experts=4, router=lora.router).eval()
    base = lora.experts.base
    with torch.no_grad():
        plain.experts.w1_EDF.copy_(base.w1_EDF.expand_as(plain.experts.w1_EDF))
        plain.experts.w2_EFO.copy_(base.w2_EFO.expand_as(plain.experts.w2_EFO))
        plain.experts.b1_EF.copy_(base.b1_EF.expand_as(plain.experts.b1_EF))
        plain.experts.b2_EO.copy_(base.b2_EO.expand_as(plain.experts.b2_EO))
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(lora(x), plain(x))
