"""Degenerate inputs of the ``MoE`` layer and of every ``conf/router/*.yaml``: each one gets a clear
``ValueError`` naming the argument, or the documented result of ``MoE``'s "Degenerate inputs"
paragraph, and routing statistics and auxiliary losses never turn NaN for lack of tokens.

- empty batches: an empty output of the input's shape, in the graph, statistics unchanged, no aux loss;
- every token masked: routed output 0 (shared experts still apply), aux losses 0, statistics 0.0;
- NaN/inf inputs: no router raises; they stay in the token's (or its group's) output;
- integer/bool/complex ``x``, masks and token ids of the wrong shape or dtype, a shared router whose
  ``num_experts`` or ``dim`` differs from the layer's: ``ValueError`` naming both sides;
- ``core.routing_stats``/``collect_aux_loss`` with no forward, eval-only or all-masked forwards, and
  ``core.losses`` with zero groups, zero tokens or every token masked: finite (0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core import aux_loss_terms, collect_aux_loss, losses, routing_stats
from core.moe import MoE
from core.routers.base_layer import balanced_assignment
from core.routers.topk import TopKRouter

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, E = 16, 32, 4
TRAIN = pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _layer(make_router, name: str, train: bool = True, **kwargs) -> MoE:
    return MoE(D, F, num_experts=E, router=make_router(name), **kwargs).train(train)


def _ids(layer: MoE, shape) -> torch.Tensor | None:
    return torch.randint(0, 50, tuple(shape)) if layer.router.needs_token_ids else None


def _finite(obj) -> bool:
    """Every number in a (nested) routing_stats result is finite."""
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def _stat_buffers(layer: MoE) -> list[torch.Tensor]:
    return [layer.stat_tokens_E.clone(), layer.stat_importance_E.clone(), layer.stat_counters.clone()]


# ---- 1. empty batches ------------------------------------------------------------------------------

@TRAIN
@pytest.mark.parametrize("shape", [(0, 16, D), (2, 0, D), (0, D)], ids=["no-sequences", "no-tokens", "2d"])
def test_empty_batch_gives_an_empty_output_and_leaves_stats_alone(router_name, make_router, train, shape):
    layer = _layer(make_router, router_name, train)
    layer.keep_last_routing = True
    x0 = torch.randn(2, 16, D)
    layer(x0, token_ids=_ids(layer, x0.shape[:-1]))  # a real forward first: stats and aux losses are set
    before = _stat_buffers(layer)
    x = torch.zeros(shape, requires_grad=True)
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    for kwargs in ({}, {"mask": mask, "token_ids": _ids(layer, shape[:-1])}):
        y = layer(x, **kwargs)
        assert y.shape == shape and y.dtype == x.dtype
        for a, b in zip(before, _stat_buffers(layer)):
            assert torch.equal(a, b), "an empty batch changed the routing statistics"
        assert layer.router.aux_losses == {}
        aux = collect_aux_loss(layer)
        assert torch.isfinite(aux) and aux.item() == 0.0
        y.sum().backward()  # in the graph, like nn.Linear's empty output
        assert x.grad is not None and x.grad.shape == shape
        routing = layer.last_routing
        assert routing.num_kept == 0 and routing.tokens_per_expert().sum().item() == 0
        assert int(routing.num_dropped) == 0
    stats = routing_stats(nn.Sequential(layer))
    assert _finite(stats)


def test_empty_batch_with_shared_experts_keeps_their_output_shape():
    layer = MoE(D, F, num_experts=E, num_shared_experts=2, out_features=8)
    x = torch.randn(0, 5, D, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 8) and y.grad_fn is not None
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_a_router_called_with_an_empty_group_names_x_GSD(router_name, make_router):
    router = make_router(router_name)(dim=D, num_experts=E)
    for shape in ((0, 4, D), (2, 0, D)):
        with pytest.raises(ValueError, match=rf"x_GSD has shape \({shape[0]}, {shape[1]}, {D}\).*at least one"):
            router(torch.zeros(shape), None, token_ids_GS=torch.zeros(shape[:2], dtype=torch.long))


# ---- 2. every token masked -------------------------------------------------------------------------

@TRAIN
@pytest.mark.parametrize("shared", [0, 1], ids=["routed", "shared"])
def test_all_masked_tokens_give_zero_routed_output_zero_losses_and_zero_stats(router_name, make_router, train,
                                                                               shared):
    layer = _layer(make_router, router_name, train, num_shared_experts=shared)
    x = torch.randn(2, 16, D)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    y = layer(x, mask=mask, token_ids=_ids(layer, mask.shape))
    assert y.shape == x.shape and torch.isfinite(y).all()
    with torch.no_grad():
        expected = torch.zeros_like(y)
        if shared:  # the shared experts are a dense FFN on every token, masked or not
            expected = layer.shared_experts.forward_expert(0, x.reshape(-1, D)).view_as(y)
    torch.testing.assert_close(y.detach(), expected)
    for name, value in layer.router.aux_losses.items():
        assert torch.isfinite(value) and value.item() == 0.0, f"aux loss {name} = {value.item()} with no tokens"
    assert collect_aux_loss(layer).item() == 0.0
    assert layer.stat_counters[1].item() == 0 and layer.stat_counters[2].item() == 0  # 0 choices of 0 tokens
    assert layer.stat_tokens_E.sum().item() == 0 and layer.stat_importance_E.sum().item() == 0
    stats = routing_stats(nn.Sequential(layer))
    assert _finite(stats)
    for key in ("load_cv2", "importance_cv2", "dropped_fraction", "experts_per_token", "entropy"):
        assert stats[key] == 0.0, key


@TRAIN
def test_integer_masks_route_like_bool_masks(router_name, make_router, train):
    """0/1 integer masks (Hugging Face's attention_mask) are read as ``mask != 0``."""
    layer = _layer(make_router, router_name, train)
    x = torch.randn(2, 16, D)
    mask = torch.rand(2, 16) > 0.3
    mask[:, 0] = True
    ids = _ids(layer, mask.shape)
    outs = []
    for m in (mask, mask.long(), mask.to(torch.uint8), mask.int()):
        torch.manual_seed(1)  # the same training noise / random routing each time
        with torch.no_grad():
            outs.append(layer(x, mask=m, token_ids=ids))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=0, atol=0)


# ---- 3. NaN and infinite inputs --------------------------------------------------------------------

@TRAIN
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs_propagate_without_errors(router_name, make_router, train, value):
    """No router raises on NaN/inf; the bad token's output is non-finite or 0 (dropped), and groups
    other than its own stay finite (the NaN sits in the last group, so Lory's next segment is none)."""
    layer = _layer(make_router, router_name, train)
    x = torch.randn(2, 16, D)
    x[1, 5, 3] = value
    ids = _ids(layer, x.shape[:-1])
    y = layer(x, token_ids=ids)
    assert y.shape == x.shape
    assert torch.isfinite(y[0]).all(), "a non-finite token spread to another routing group"
    bad = y[1, 5]
    assert (~torch.isfinite(bad)).any() or (bad == 0).all(), "a non-finite token got a finite non-zero output"
    for name, v in layer.router.aux_losses.items():
        assert v.dim() == 0, name
    routing_stats(nn.Sequential(layer))  # may hold NaN, must not raise
    y_all = layer(torch.full((2, 16, D), value), token_ids=ids)  # every value non-finite: still no error
    assert y_all.shape == x.shape


def test_base_assignment_accepts_non_finite_affinities():
    aff = torch.randn(8, 4)
    aff[2] = float("nan")
    aff[5, 1] = float("inf")
    aff[6, 0] = float("-inf")
    expert = balanced_assignment(aff, 2)
    assert expert.shape == (8,) and ((0 <= expert) & (expert < 4)).all()
    assert torch.bincount(expert, minlength=4).tolist() == [2, 2, 2, 2]


# ---- 4. non-floating x -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8, torch.bool, torch.complex64],
                         ids=str)
def test_non_floating_x_is_refused_naming_its_dtype(router_name, make_router, dtype):
    layer = _layer(make_router, router_name)
    x = torch.ones(2, 4, D, dtype=dtype)
    with pytest.raises(ValueError, match=rf"x has dtype {dtype}; a floating dtype"):
        layer(x, token_ids=_ids(layer, x.shape[:-1]))
    with pytest.raises(ValueError, match=rf"x_GSD has dtype {dtype}; a floating dtype"):
        layer.router(x, None, token_ids_GS=torch.zeros(2, 4, dtype=torch.long))


# ---- 5. masks, token ids and x of the wrong shape or dtype -----------------------------------------

def test_layer_arguments_of_the_wrong_shape_or_dtype_are_named():
    layer = MoE(D, F, num_experts=E)
    x = torch.randn(2, 4, D)
    cases = [
        (dict(mask=torch.ones(2, 5, dtype=torch.bool)), r"mask has shape \(2, 5\); the shape \(2, 4\)"),
        (dict(mask=torch.ones(2, 4, 1, dtype=torch.bool)), r"mask has shape \(2, 4, 1\); the shape \(2, 4\)"),
        (dict(mask=torch.ones(8, dtype=torch.bool)), r"mask has shape \(8,\); the shape \(2, 4\)"),
        (dict(mask=torch.ones(2, 4)), r"mask has dtype torch.float32; a bool mask"),
        (dict(mask=[[True] * 4] * 2), r"mask must be a torch.Tensor of shape \(2, 4\)"),
        (dict(token_ids=torch.ones(2, 5, dtype=torch.long)), r"token_ids has shape \(2, 5\); the shape \(2, 4\)"),
        (dict(token_ids=torch.ones(2, 4)), r"token_ids has dtype torch.float32; integer token ids"),
        (dict(token_ids=torch.ones(2, 4, dtype=torch.bool)), r"token_ids has dtype torch.bool; integer token ids"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            layer(x, **kwargs)
    with pytest.raises(ValueError, match=rf"x has shape \(2, 4, {D + 1}\); its last dimension must be in_features"):
        layer(torch.randn(2, 4, D + 1))
    with pytest.raises(ValueError, match=r"x has shape \(\); its last dimension"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"x must be a torch.Tensor"):
        layer([[0.0] * D])
    # accepted: uint8/long masks, int32 ids, a 1-D token and 2-D/4-D inputs
    assert layer(x, mask=torch.ones(2, 4, dtype=torch.uint8), token_ids=torch.ones(2, 4, dtype=torch.int32)).shape \
        == x.shape
    assert layer(torch.randn(D)).shape == (D,) and layer(torch.randn(2, 3, 4, D)).shape == (2, 3, 4, D)


def test_router_arguments_of_the_wrong_shape_or_dtype_are_named(router_name, make_router):
    router = make_router(router_name)(dim=D, num_experts=E)
    x = torch.randn(2, 4, D)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"x_GSD has shape \(8, {D}\); a router routes \(G, S, dim={D}\)"):
        router(x.view(8, D), None, token_ids_GS=ids)
    with pytest.raises(ValueError, match=rf"x_GSD has shape \(2, 4, {D + 1}\)"):
        router(torch.randn(2, 4, D + 1), None, token_ids_GS=ids)
    with pytest.raises(ValueError, match=r"mask_GS has shape \(2, 5\); the shape \(2, 4\)"):
        router(x, torch.ones(2, 5, dtype=torch.bool), token_ids_GS=ids)
    with pytest.raises(ValueError, match=r"mask_GS has dtype torch.float32"):
        router(x, torch.ones(2, 4), token_ids_GS=ids)
    with pytest.raises(ValueError, match=r"token_ids_GS has shape \(2, 5\); the shape \(2, 4\)"):
        router(x, None, token_ids_GS=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_ids_GS has dtype torch.float32"):
        router(x, None, token_ids_GS=torch.zeros(2, 4))
    router(x, torch.ones(2, 4, dtype=torch.long), token_ids_GS=ids)  # a 0/1 integer mask is accepted


# ---- 6. a shared router that does not fit the layer ------------------------------------------------

def test_a_shared_router_must_match_the_layers_experts_and_width(router_name, make_router):
    partial = make_router(router_name)
    with pytest.raises(ValueError, match=r"router.num_experts=4 does not match num_experts=8"):
        MoE(D, F, num_experts=8, router=partial(dim=D, num_experts=4))
    with pytest.raises(ValueError, match=rf"router.dim=8 does not match in_features={D}"):
        MoE(D, F, num_experts=E, router=partial(dim=8, num_experts=E))
    MoE(D, F, num_experts=E, router=partial(dim=D, num_experts=E))  # a matching instance is fine


def test_a_router_factory_must_build_a_router():
    with pytest.raises(ValueError, match=r"router built a Linear, not a core Router"):
        MoE(D, F, num_experts=E, router=lambda dim, num_experts: nn.Linear(dim, num_experts))


# ---- 7. statistics and losses without tokens -------------------------------------------------------

def test_routing_stats_without_any_forward_are_empty_and_finite():
    model = nn.Sequential(MoE(D, F, num_experts=E), nn.GELU(), MoE(D, F, num_experts=E))
    stats = routing_stats(model)
    assert stats == {"layers": {}} and _finite(stats)
    assert collect_aux_loss(model).item() == 0.0 and aux_loss_terms(model) == {}


def test_routing_stats_after_eval_only_forwards_are_finite(router_name, make_router):
    layer = _layer(make_router, router_name, train=False)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 16, D)
            layer(x, token_ids=_ids(layer, x.shape[:-1]))
    stats = routing_stats(nn.Sequential(layer), reset=True)
    assert set(stats["layers"]) == {"0"} and _finite(stats)
    assert layer.router.aux_losses == {} and collect_aux_loss(layer).item() == 0.0
    assert routing_stats(nn.Sequential(layer)) == {"layers": {}}  # after the reset


def test_aux_losses_of_a_model_that_saw_only_masked_tokens_are_zero(router_name, make_router):
    model = nn.Sequential(_layer(make_router, router_name), _layer(make_router, router_name)).train()
    x = torch.randn(3, 16, D)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    ids = _ids(model[0], mask.shape)
    h = x
    for layer in model:
        h = layer(h, mask=mask, token_ids=ids)
    total = collect_aux_loss(model)
    assert torch.isfinite(total) and total.item() == 0.0
    assert all(v.item() == 0.0 for v in aux_loss_terms(model).values())
    stats = routing_stats(model)
    assert _finite(stats) and stats["dropped_fraction"] == 0.0 and stats["entropy"] == 0.0


def _zero_token_cases():
    """(probs, logits, idx, mask): no groups, groups without tokens, groups whose tokens are all masked."""
    Ek, K = 4, 2
    for name, (G, S), masked in [("G=0", (0, 5), False), ("S=0", (3, 0), False), ("all-masked", (3, 5), True)]:
        logits = torch.randn(G, S, Ek, requires_grad=True)
        mask = torch.zeros(G, S, dtype=torch.bool) if masked else None
        yield name, logits, K, mask


@pytest.mark.parametrize("case", list(_zero_token_cases()), ids=lambda c: c[0])
def test_losses_with_zero_tokens_are_zero_and_differentiable(case):
    _, logits, K, mask = case
    probs = logits.softmax(-1)
    idx = probs.topk(K, dim=-1).indices
    noisy = logits + 0.1
    values = {
        "importance": losses.importance_loss(probs, mask),
        "load": losses.load_loss(logits, noisy, 0.1, K, mask),
        "switch": losses.switch_loss(probs, idx, mask),
        "gshard": losses.gshard_loss(probs, mask),
        "z": losses.z_loss(logits, mask),
        "local_entropy": losses.local_entropy_loss(probs, mask),
        "global_entropy": losses.global_entropy_loss(probs, mask),
        "null_aware_switch": losses.null_aware_switch_loss(probs, idx, 1, mask),
    }
    for name, v in values.items():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() == 0.0, f"{name} = {v.item()} with no tokens"
    torch.stack(list(values.values())).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    modality = torch.zeros(logits.shape[:2], dtype=torch.long)
    assert losses.modality_entropy_losses(probs, modality, 2, mask) == {}  # no modality has a token


def test_global_entropy_of_a_group_without_tokens_is_zero():
    probs = torch.randn(2, 6, 4).softmax(-1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    alone = losses.global_entropy_loss(probs[:1], mask[:1], threshold=5.0)
    assert alone.item() > 0
    torch.testing.assert_close(losses.global_entropy_loss(probs, mask, threshold=5.0), alone / 2)


def test_merged_routings_do_not_count_padding():
    """SMEAR/Lory merge weights times the group's valid tokens: padding is not a token routed."""
    from core.routers.smear import SmearRouter

    layer = MoE(D, F, num_experts=E, router=SmearRouter)
    layer.keep_last_routing = True
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 3:] = False
    layer(torch.randn(2, 8, D), mask=mask)
    assert layer.last_routing.tokens_per_expert().sum().item() == pytest.approx(8 + 3)
    assert layer.stat_tokens_E.sum().item() == pytest.approx(8 + 3)


def test_a_bool_mask_passes_the_router_checks_untouched():
    """The router's input checks read shapes and dtypes only: a bool mask is handed on as it is."""
    router = TopKRouter(D, E)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert router.check_input(torch.randn(2, 4, D), mask) is mask
    assert router.check_input(torch.randn(2, 4, D)) is None
