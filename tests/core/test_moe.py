"""The MoE layer: equal to the study's dense dispatch/combine formulation for every router config,
equal to timm's Mlp with one expert, grouped experts equal to the per-expert loop, argument
validation, padding masks in routing and statistics, and auxiliary-loss collection."""

from __future__ import annotations

import functools

import pytest
import timm.layers
import torch
from torch import nn

import core.experts
from core import collect_aux_loss, losses, routing_stats
from core.experts import Experts
from core.moe import MoE
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.topk import TopKRouter
from core.routing import Routing


pytestmark = pytest.mark.usefixtures("one_thread")

D, F = 16, 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _padded_groups(x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, int]:
    """x (…, D) as the layer's G×S×D groups (last partial group zero-padded) and the real T."""
    x_TD = x.reshape(-1, x.shape[-1])
    T = x_TD.shape[0]
    G, S = routing.num_groups, routing.group_size
    x_TD = torch.cat([x_TD, x_TD.new_zeros(G * S - T, x_TD.shape[1])])
    return x_TD.view(G, S, -1), T


def _merged_reference(experts: Experts, x_GSD: torch.Tensor, merge_GE: torch.Tensor) -> torch.Tensor:
    """One FFN per group with parameters Σ_e merge[g,e]·θ_e, written out parameter by parameter."""
    outs = []
    for g in range(x_GSD.shape[0]):
        m = merge_GE[g]
        mix = lambda p: torch.einsum("e,e...->...", m, p)  # noqa: E731
        h = x_GSD[g] @ mix(experts.w1_EDF)
        if experts.b1_EF is not None:
            h = h + mix(experts.b1_EF)
        h = experts.act(h)
        if experts.w3_EDF is not None:
            h = h * (x_GSD[g] @ mix(experts.w3_EDF))
        y = experts.norm(h) @ mix(experts.w2_EFO)
        if experts.b2_EO is not None:
            y = y + mix(experts.b2_EO)
        outs.append(y)
    return torch.stack(outs)


def reference_output(layer: MoE, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """docs/routers.md §1: x̃[g,e,c] = Σ_s D[g,s,e,c] x[g,s]; y[g,s] = Σ_{e,c} W[g,s,e,c] f_e(x̃[g,e,c]),
    each expert applied on its own with ``Experts.forward_expert``; plus the residual mix if any."""
    x_GSD, T = _padded_groups(x, routing)
    G, S, _ = x_GSD.shape
    if routing.is_merged:
        y_GSO = _merged_reference(layer.experts, x_GSD, routing.merge_GE)
    else:
        dispatch, combine = routing.dense_dispatch_combine()
        C = dispatch.shape[-1]
        slots_EGCD = torch.einsum("gsec,gsd->egcd", dispatch.to(x.dtype), x_GSD)
        out_EGCO = torch.stack([
            layer.experts.forward_expert(e, slots_EGCD[e].reshape(G * C, -1)).view(G, C, -1)
            for e in range(layer.num_experts)
        ])
        y_GSO = torch.einsum("gsec,egco->gso", combine.to(x.dtype), out_EGCO)
    y_TO = y_GSO.reshape(G * S, -1)
    if routing.residual_T is not None:
        y_TO = y_TO + routing.residual_T[:, None] * x_GSD.reshape(G * S, -1)
    return y_TO[:T].view(*x.shape[:-1], -1)


@pytest.mark.parametrize("layout", ["per_sequence", "group_size_4"])
def test_moe_equals_dense_formulation(router_name, make_router, layout):
    E = 4
    group_size = None if layout == "per_sequence" else 4
    layer = MoE(D, F, num_experts=E, router=make_router(router_name), group_size=group_size).eval()
    layer.keep_last_routing = True
    x = torch.randn(3, 10, D) if layout == "per_sequence" else torch.randn(2, 7, D)
    token_ids = torch.randint(0, 50, x.shape[:-1]) if layer.router.needs_token_ids else None
    with torch.no_grad():
        y = layer(x, token_ids=token_ids)
        routing = layer.last_routing
        assert routing.num_groups * routing.group_size >= x.shape[0] * x.shape[1]
        expected = reference_output(layer, x, routing)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def _mlp_router(**kw):
    return functools.partial(TopKRouter, top_k=1, capacity_factor=None, noise_std=0.0, renormalize=True,
                             importance_loss_weight=0.0, load_loss_weight=0.0, **kw)


@pytest.mark.parametrize("shape", [(2, 5, D), (7, D)], ids=["3d", "2d"])
def test_one_expert_moe_equals_timm_mlp(shape):
    mlp = timm.layers.Mlp(D, F)
    layer = MoE(D, F, num_experts=1, router=_mlp_router())
    layer.experts.load_dense_mlp(mlp.fc1, mlp.fc2)
    x = torch.randn(*shape)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_mlp, y_moe = mlp(x1), layer(x2)
    torch.testing.assert_close(y_moe, y_mlp, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_mlp)
    (y_mlp * g).sum().backward()
    (y_moe * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w1_EDF.grad[0], mlp.fc1.weight.grad.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.b2_EO.grad[0], mlp.fc2.bias.grad, rtol=1e-5, atol=1e-6)


def test_one_expert_glu_moe_equals_timm_swiglu():
    mlp = timm.layers.SwiGLU(D, F, act_layer=nn.SiLU, bias=False)
    layer = MoE(D, F, num_experts=1, router=_mlp_router(), glu=True, act_layer=nn.SiLU, bias=False)
    layer.experts.load_dense_mlp(mlp.fc1_g, mlp.fc2, mlp.fc1_x)
    x = torch.randn(3, 6, D)
    torch.testing.assert_close(layer(x), mlp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [2, 2, 2, 2]], ids=["uneven", "one_busy", "even"])
def test_grouped_experts_equal_loop(glu, counts):
    kw = dict(act_layer=nn.SiLU if glu else nn.GELU, glu=glu)
    grouped = Experts(4, D, F, impl="grouped", **kw)
    loop = Experts(4, D, F, impl="loop", **kw)
    loop.load_state_dict(grouped.state_dict())
    counts_E = torch.tensor(counts)
    expert_N = torch.repeat_interleave(torch.arange(4), counts_E)
    x = torch.randn(int(counts_E.sum()), D)
    g = torch.randn(x.shape[0], D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = grouped(xa, counts_E, expert_N), loop(xb, counts_E, expert_N)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for (name, pa), pb in zip(grouped.named_parameters(), loop.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-5, msg=name)


# every engine that is not the reference loop ("grouped"; newer Experts add more, e.g. "chunked")
FAST_IMPLS = [i for i in getattr(core.experts, "IMPLS", ("auto", "grouped", "loop")) if i not in ("auto", "loop")]


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
@pytest.mark.parametrize("num_tokens", [3, 40], ids=["empty_experts", "uneven"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_moe_fast_experts_equal_loop(impl, num_tokens, glu):
    """Through the layer, outputs and gradients; 3 tokens over 8 experts leave some experts empty."""
    kw = dict(num_experts=8, router=functools.partial(TopKRouter, top_k=2), glu=glu,
              act_layer=nn.SiLU if glu else nn.GELU)
    a = MoE(D, F, expert_impl=impl, **kw).eval()
    b = MoE(D, F, expert_impl="loop", **kw).eval()
    b.load_state_dict(a.state_dict())
    a.keep_last_routing = True
    x = torch.randn(1, num_tokens, D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = a(xa), b(xb)
    counts = a.last_routing.tokens_per_expert()
    assert (counts == 0).any() if num_tokens == 3 else len(set(counts.tolist())) > 1
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_grouped_experts_backward_from_a_sum():
    """``y.sum().backward()`` hands the expert output an expanded (stride-0) gradient."""
    experts = Experts(4, D, F, impl="grouped")
    counts_E = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, D, requires_grad=True)
    experts(x, counts_E, torch.repeat_interleave(torch.arange(4), counts_E)).sum().backward()
    grad_grouped = x.grad.clone()
    x.grad = None
    experts.forward_loop(x, counts_E).sum().backward()
    torch.testing.assert_close(grad_grouped, x.grad, rtol=1e-5, atol=1e-5)


def test_shared_experts_add_an_always_on_ffn():
    layer = MoE(D, F, num_experts=4, num_shared_experts=1).eval()
    layer.keep_last_routing = True
    x = torch.randn(2, 6, D, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        routed = reference_output(layer, x, layer.last_routing)
        shared = layer.shared_experts.forward_expert(0, x.reshape(-1, D)).view_as(routed)
    torch.testing.assert_close(y, routed + shared, rtol=1e-4, atol=1e-5)
    (y * torch.randn_like(y)).sum().backward()
    assert layer.shared_experts.w1_EDF.grad is not None and layer.shared_experts.w1_EDF.grad.abs().sum() > 0


def test_moe_with_shared_experts_backward_from_a_sum():
    """The shared experts' output is added unweighted, so ``y.sum()`` hands them a stride-0 gradient."""
    layer = MoE(D, F, num_experts=4, num_shared_experts=1)
    x = torch.randn(2, 6, D, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- argument validation -----------------------------------------------------------------------

def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="top_k"):
        MoE(D, F, num_experts=4, router=functools.partial(TopKRouter, top_k=5))
    for cf in (0, -0.5):
        with pytest.raises(ValueError, match="capacity_factor"):
            MoE(D, F, num_experts=4, router=functools.partial(TopKRouter, capacity_factor=cf))
    with pytest.raises(ValueError, match="num_experts"):
        MoE(D, F, num_experts=0)
    with pytest.raises(ValueError, match="in_features"):
        MoE(D, F, num_experts=4, router=TopKRouter(D + 1, 4))
    layer = MoE(D, F, num_experts=4)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="group_size"):
        MoE(D, F, num_experts=4, group_size=0)
    with pytest.raises(ValueError, match="impl"):
        Experts(4, D, F, impl="fast")


# ---- padding masks and statistics --------------------------------------------------------------

def _random_mask(shape) -> torch.Tensor:
    mask = torch.rand(shape) > 0.4
    mask.view(-1)[0] = True
    return mask


@pytest.mark.parametrize("group_size", [None, 5])
def test_padding_never_routed_nor_counted(group_size):
    """Dropless top-2: tokens_per_expert sums to 2 × valid tokens, masked ones appear nowhere."""
    K = 2
    layer = MoE(D, F, num_experts=4, group_size=group_size,
                router=functools.partial(TopKRouter, top_k=K, capacity_factor=None))
    layer.keep_last_routing = True
    model = nn.Sequential(layer)
    x = torch.randn(3, 7, D)
    mask = _random_mask((3, 7))
    n_valid = int(mask.sum())
    layer(x, mask=mask)
    routing = layer.last_routing
    valid_T = torch.zeros(routing.num_tokens, dtype=torch.bool)
    valid_T[:21] = mask.reshape(-1)
    assert valid_T[routing.token_idx_N].all()
    assert routing.num_kept == n_valid * K
    stats = routing_stats(model)["layers"]["0"]
    assert sum(stats["tokens_per_expert"]) == n_valid * K
    assert stats["experts_per_token"] == pytest.approx(K)
    assert stats["dropped_fraction"] == 0.0


def test_padding_is_not_a_dropped_choice_for_expert_choice():
    layer = MoE(D, F, num_experts=4, router=functools.partial(ExpertChoiceRouter, capacity_factor=2.0)).eval()
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :2] = True  # 2 valid tokens, C = 4: two slots per expert stay empty
    mask[1] = True
    layer(torch.randn(2, 8, D), mask=mask)
    stats = routing_stats(nn.Sequential(layer))["layers"]["0"]
    assert stats["dropped_fraction"] == 0.0
    assert sum(stats["tokens_per_expert"]) == 4 * (2 + 4)


def test_padding_not_counted_for_any_router(router_name, make_router):
    layer = MoE(D, F, num_experts=4, router=make_router(router_name), group_size=8)
    layer.keep_last_routing = True
    x = torch.randn(2, 12, D)
    mask = _random_mask((2, 12))
    token_ids = torch.randint(0, 50, (2, 12)) if layer.router.needs_token_ids else None
    layer.eval()
    layer(x, mask=mask, token_ids=token_ids)
    routing = layer.last_routing
    valid_GS = torch.zeros(routing.num_tokens, dtype=torch.bool)
    valid_GS[:24] = mask.reshape(-1)
    valid_GS = valid_GS.view(routing.num_groups, routing.group_size)
    assert layer.stat_counters[2].item() == mask.sum().item(), "valid-token count includes padding"
    torch.testing.assert_close(layer.stat_tokens_E, routing.tokens_per_expert().to(torch.float64))
    if routing.scores_GSE is not None:
        expected = (routing.scores_GSE * valid_GS[..., None]).sum((0, 1)).to(torch.float64)
        torch.testing.assert_close(layer.stat_importance_E, expected)
    if not (routing.is_soft or routing.is_merged):
        assert valid_GS.reshape(-1)[routing.token_idx_N].all()
    elif routing.is_soft:
        assert (routing.dispatch_GSEP[~valid_GS] == 0).all()


# ---- auxiliary losses --------------------------------------------------------------------------

def test_collect_aux_loss_sums_topk_losses_in_training_only():
    layers = [MoE(D, F, num_experts=4, router=functools.partial(TopKRouter, top_k=2)) for _ in range(2)]
    model = nn.Sequential(*layers)
    recorded = []
    for layer in layers:
        original = layer.router.add_noise

        def add_noise(logits, noise_std, _original=original):
            noisy = _original(logits, noise_std)
            recorded.append((logits.detach(), noisy.detach()))
            return noisy

        layer.router.add_noise = add_noise
    x = torch.randn(2, 8, D)
    mask = _random_mask((2, 8))
    model.train()
    h = x
    for layer in layers:
        h = layer(h, mask=mask)
    total = collect_aux_loss(model)
    expected = 0.0
    for logits, noisy in recorded:
        expected = expected + 0.005 * losses.importance_loss(logits.softmax(-1), mask)
        expected = expected + 0.005 * losses.load_loss(logits, noisy, 1.0 / 4, 2, mask)
    assert len(recorded) == 2
    assert total.item() == pytest.approx(float(expected), rel=1e-5)
    assert total.item() > 0
    total.backward()
    assert all(layer.router.weight.grad is not None for layer in layers)
    model.eval()
    with torch.no_grad():
        for layer in layers:
            layer(x)
    assert collect_aux_loss(model).item() == 0.0
