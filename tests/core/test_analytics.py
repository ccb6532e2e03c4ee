"""Routing analytics (core.analytics) on small hand-made routings with known answers, plus the
recorder over a real MoE layer."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from core import analytics
from core.moe import MoE
from core.routers.adamoe import AdaMoERouter
from core.routers.hash import HashRouter
from core.routers.topk import TopKRouter
from core.routing import Routing

D = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _routing(G, S, E, tokens, experts, weights=None, num_choices=None, capacity=None, mask=None, **extras):
    tok = torch.tensor(tokens, dtype=torch.long)
    w = torch.ones(len(tokens)) if weights is None else torch.tensor(weights, dtype=torch.float32)
    r = Routing(num_groups=G, group_size=S, num_experts=E, token_idx_N=tok,
                expert_idx_N=torch.tensor(experts, dtype=torch.long), weight_N=w, capacity=capacity,
                num_choices=len(tokens) if num_choices is None else num_choices,
                scores_GSE=torch.full((G, S, E), 1.0 / E), mask_GS=mask)
    r.extras.update(extras)
    return r


def test_top_expert_picks_the_largest_gate():
    r = _routing(1, 4, 3, tokens=[0, 0, 1, 1, 3], experts=[2, 1, 0, 2, 1], weights=[0.3, 0.7, 0.5, 0.5, 0.1])
    # token 1 ties: the lowest id wins; token 2 has no assignment
    assert analytics.top_expert(r).tolist() == [1, 0, -1, 1]
    merged = Routing(num_groups=2, group_size=2, num_experts=3, merge_GE=torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]),
                     scores_GSE=torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])[:, None].expand(2, 2, 3))
    assert analytics.top_expert(merged).tolist() == [1, 1, 0, 0]


def test_drop_rate_by_position_hand_made():
    # G=2, S=4, K=1: group 0 loses its last token, group 1 its last two
    r = _routing(2, 4, 2, tokens=[0, 1, 2, 4, 5], experts=[0, 1, 0, 0, 1], num_choices=8, capacity=2)
    torch.testing.assert_close(analytics.drop_rate_by_position(r), torch.tensor([0, 0, 0.5, 1], dtype=torch.float64))
    torch.testing.assert_close(analytics.drop_rate_by_position(r, num_bins=2), torch.tensor([0, 0.75], dtype=torch.float64))
    # a padded position counts nowhere; a position with no valid token is NaN
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    rm = _routing(2, 4, 2, tokens=[0, 1, 4, 5], experts=[0, 1, 0, 1], num_choices=5, capacity=2, mask=mask)
    rate = analytics.drop_rate_by_position(rm)
    torch.testing.assert_close(rate[:3], torch.tensor([0, 0, 1], dtype=torch.float64))
    assert math.isnan(rate[3])
    # K=2 with one of token 1's two choices dropped
    r2 = _routing(1, 2, 3, tokens=[0, 1, 0], experts=[0, 1, 2], num_choices=4, capacity=1)
    assert analytics.drop_rate_by_position(r2).tolist() == [0.0, 1.0]
    # expert choice: choices cannot be inferred; with 1 choice per token the rate counts untaken tokens
    ec = _routing(1, 3, 2, tokens=[0, 0], experts=[0, 1], num_choices=2, capacity=1)
    with pytest.raises(ValueError, match="choices_per_token"):
        analytics.drop_rate_by_position(_routing(1, 3, 2, tokens=[0, 0, 2, 1], experts=[0, 1, 0, 1], num_choices=4))
    assert analytics.drop_rate_by_position(ec, choices_per_token=1).tolist() == [0.0, 1.0, 1.0]


def test_drop_towards_the_end_without_priority():
    router = TopKRouter(D, 4, top_k=1, capacity_factor=0.5, noise_std=0.0).eval()
    routing = router(torch.randn(8, 64, D))
    rate = analytics.drop_rate_by_position(routing, num_bins=4)
    assert rate[0] == 0  # the first eighth of a group always finds room (C = 8 per expert)
    assert rate[-1] > rate[0] and rate[-1] > 0.5


def test_specialisation_known_cases():
    # labels determine the expert: share 1, purity 1
    r = _routing(1, 6, 3, tokens=list(range(6)), experts=[0, 0, 1, 1, 2, 2])
    spec = analytics.specialisation(r, torch.tensor([5, 5, 7, 7, 9, 9]))
    assert spec["share"] == pytest.approx(1.0) and spec["purity"] == 1.0 and spec["nmi"] == pytest.approx(1.0)
    # labels independent of the expert: share 0, purity = 1/2
    r = _routing(1, 8, 2, tokens=list(range(8)), experts=[0, 1, 0, 1, 0, 1, 0, 1])
    spec = analytics.specialisation(r, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert spec["share"] == pytest.approx(0.0, abs=1e-12) and spec["purity"] == 0.5
    assert spec["h_expert"] == pytest.approx(math.log(2))
    # a random case agrees with scikit-learn's normalised mutual information (arithmetic mean)
    experts = torch.randint(0, 4, (200,))
    labels = (experts + torch.randint(0, 3, (200,))) % 5
    r = _routing(1, 200, 4, tokens=list(range(200)), experts=experts.tolist())
    spec = analytics.specialisation(r, labels)
    assert spec["nmi"] == pytest.approx(normalized_mutual_info_score(labels.numpy(), experts.numpy()), rel=1e-6)
    assert 0 < spec["share"] < 1
    # min_count leaves rare labels out; dropped tokens and unlabelled tokens are ignored
    r = _routing(1, 5, 2, tokens=[0, 1, 2, 3], experts=[0, 0, 1, 1])
    spec = analytics.specialisation(r, torch.tensor([0, 0, 1, 2, 0]), min_count=2)
    assert spec["tokens"] == 2 and spec["purity"] == 1.0


def test_routing_stability():
    a = _routing(1, 6, 3, tokens=list(range(6)), experts=[0, 0, 1, 1, 2, 2])
    b = _routing(1, 6, 3, tokens=list(range(6)), experts=[0, 0, 1, 1, 0, 0])
    ids = torch.tensor([10, 10, 11, 11, 12, 12])
    assert analytics.routing_stability(a, a, ids) == 1.0
    assert analytics.routing_stability(a, b, ids) == pytest.approx(2 / 3)
    assert analytics.routing_stability(a, b) == pytest.approx(4 / 6)  # token by token
    # weighted by count: id 10 seen 4 times, id 11 twice, only id 11 changes
    c = _routing(1, 6, 2, tokens=list(range(6)), experts=[0, 0, 0, 0, 1, 1])
    d = _routing(1, 6, 2, tokens=list(range(6)), experts=[0, 0, 0, 0, 0, 0])
    ids = torch.tensor([10, 10, 10, 10, 11, 11])
    assert analytics.routing_stability(c, d, ids) == 0.5
    assert analytics.routing_stability(c, d, ids, weighted=True) == pytest.approx(4 / 6)
    assert analytics.routing_stability(c, d, ids, min_count=3) == 1.0


def test_null_expert_stats():
    # 4 valid tokens with 2, 1, 0, 1 true experts; K = 4 among true + null
    r = _routing(1, 4, 3, tokens=[0, 0, 1, 3], experts=[0, 2, 1, 1], top_k=4)
    stats = analytics.null_expert_stats(r)
    assert stats == {"true_experts_per_token": 1.0, "flop_ratio": 0.25, "null_only_fraction": 0.25}
    assert analytics.null_expert_stats(r, reference_top_k=2)["flop_ratio"] == 0.5
    router = AdaMoERouter(D, 4, num_null_experts=8, top_k=4).eval()
    routing = router(torch.randn(2, 32, D))
    stats = analytics.null_expert_stats(routing)
    assert stats["true_experts_per_token"] == pytest.approx(float(routing.extras["true_experts_per_token"]))
    assert stats["flop_ratio"] < 1.0


def test_recorder_over_a_model():
    layer = MoE(D, 32, num_experts=4, router=HashRouter)
    other = MoE(D, 32, num_experts=4, router=functools.partial(TopKRouter, top_k=1, capacity_factor=0.5))
    model = torch.nn.Sequential(layer, other).eval()
    rec = analytics.RoutingRecorder(model)
    ids = torch.randint(0, 40, (2, 16))
    for _ in range(3):
        x = torch.randn(2, 16, D)
        layer(x, token_ids=ids)
        other(x, token_ids=ids)
    report = rec.summary()
    rec.close()
    hashed, topk = report["0"], report["1"]
    assert hashed["specialisation"]["share"] == pytest.approx(1.0)  # the expert is a function of the id
    assert hashed["specialisation"]["purity"] == 1.0
    assert hashed["drop_rate_by_position"] == [0.0] * 16 and hashed["experts_per_token"] == 1.0
    assert topk["drop_rate_by_position"][0] == 0.0 and max(topk["drop_rate_by_position"]) > 0
    assert hashed["counts_LE"].sum() == 3 * 32
    assert not layer.keep_last_routing and not layer._forward_hooks
