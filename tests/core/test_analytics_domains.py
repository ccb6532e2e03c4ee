"""The OpenMoE and X-MoE analyses in every domain (issue 21): representation collapse on known vectors,
label providers (position, per-example class, layer modality), ``analyse_routing`` with a domain's
forward and labels, and the section of ``core.compare``."""

from __future__ import annotations

import functools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core import analytics
from core.moe import MoE
from core.routers.topk import TopKRouter


def _cfg(**kw):
    base = dict(max_batches=2, min_token_count=1, capacity_factor=1.0, baseline_top_k=2)
    base.update(kw)
    return SimpleNamespace(**base)


def _moments(x_ND):
    x = x_ND.double()
    return x.T @ x, x.sum(0), x.shape[0]


def test_collapse_share_is_one_in_the_gate_span_and_zero_orthogonal_to_it():
    g = torch.Generator().manual_seed(0)
    D, E = 8, 2
    gate = torch.zeros(E, D, dtype=torch.float64)
    gate[0, 0], gate[1, 1] = 1.0, 2.0  # span = first two axes
    inside = torch.zeros(500, D)
    inside[:, :2] = torch.randn(500, 2, generator=g)
    outside = torch.zeros(500, D)
    outside[:, 2:] = torch.randn(500, D - 2, generator=g)
    iso = torch.randn(20000, D, generator=g)
    assert analytics.representation_collapse(*_moments(inside), gate)["gate_span_share"] == pytest.approx(1.0)
    assert analytics.representation_collapse(*_moments(outside), gate)["gate_span_share"] == pytest.approx(0.0, abs=1e-9)
    c = analytics.representation_collapse(*_moments(iso), gate)
    assert c["gate_span_isotropic"] == pytest.approx(2 / 8)
    assert c["gate_span_share"] == pytest.approx(0.25, abs=0.02)
    # effective rank: k equal-variance axes give k; isotropic tokens nearly D
    assert analytics.representation_collapse(*_moments(inside))["effective_rank"] == pytest.approx(2.0, rel=0.05)
    assert c["effective_rank_ratio"] == pytest.approx(1.0, abs=0.02)


def test_label_providers_follow_the_layer_input():
    x = torch.zeros(3, 5, 4)
    assert analytics.position_labels(None, x).tolist() == [list(range(5))] * 3
    cls = analytics.example_labels(torch.tensor([7, 8, 9]))
    assert cls(None, x)[:, 0].tolist() == [7, 8, 9] and cls(None, x).shape == (3, 5)
    assert cls(None, torch.zeros(2, 5, 4)) is None  # not this batch's examples
    layer = SimpleNamespace(modality="text")
    mod = analytics.constant_labels("modality", ("image", "text"))
    assert mod(layer, x).unique().tolist() == [1] and mod(SimpleNamespace(), x) is None


class _Tiny(nn.Module):
    """Tokens that depend only on their position (plus a little noise): the position determines
    the routing, the class label does not."""

    def __init__(self, D=16, E=4, S=8):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(torch.randn(S, D) * 3)
        self.moe = MoE(D, 16, num_experts=E, router=functools.partial(TopKRouter, top_k=1, capacity_factor=None,
                                                                       noise_std=0.0))

    def forward(self, x_B):
        h = self.pos.expand(x_B.shape[0], -1, -1) + 0.01 * torch.randn(x_B.shape[0], *self.pos.shape)
        return self.moe(h)


def _batches(n=2, B=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.zeros(B), torch.randint(0, 3, (B,), generator=g)) for _ in range(n)]


def test_analyse_routing_with_a_domains_labels_and_snapshots(tmp_path):
    model = _Tiny()
    batches = _batches()

    def labels(batch):
        return {"position": analytics.position_labels, "class": analytics.example_labels(batch[1])}

    snaps = analytics.RoutingSnapshots([0], batches, 2, tmp_path, labels=labels)
    snaps.on_step_start(None, model, SimpleNamespace(step=0))
    assert (tmp_path / "routing_snapshots.pt").is_file() and set(snaps.snapshots[0][0]) == {"position", "class"}
    out = analytics.analyse_routing(model, batches, _cfg(), snaps.snapshots, labels=labels,
                                    not_applicable={"modality": "one modality"})
    assert out["explained_by_position"] == pytest.approx(1.0)  # the position determines the expert
    assert out["explained_by_class"] < 0.5
    assert out["position_purity"] == pytest.approx(1.0) and out["uniform_purity"] == 0.25
    assert out["stability"]["0"]["agreement"] == pytest.approx(1.0)  # nothing trained in between
    assert out["stability_label"] == "position" and out["not_applicable"] == {"modality": "one modality"}
    assert len(out["drop_rate_by_position"]["no_bpr"]["per_position"]) == 8
    col = out["representation_collapse"]
    assert 0.0 <= col["gate_span_share"] <= 1.0 and col["gate_span_isotropic"] == pytest.approx(4 / 16)
    summary = analytics.analysis_summary(out)
    assert {"explained_by_position", "explained_by_class", "routing_agreement", "gate_span_share",
            "effective_rank_ratio", "drop_rate_no_bpr"} <= set(summary)
    json.dumps(out, default=analytics.plain)


def test_compare_lists_the_routing_analyses(tmp_path):
    from core.compare import report, scan

    for name, analysis in (("a", {"explained_by_position": 0.36, "routing_agreement": {"3": 0.75},
                                  "drop_rate_no_bpr": {"mean": 0.1, "first_quarter": 0.0, "last_quarter": 0.35},
                                  "gate_span_share": 0.06, "gate_span_isotropic": 0.125,
                                  "effective_rank_ratio": 0.08}),
                           ("b", None)):
        d = tmp_path / name
        d.mkdir()
        m = {"domain": "vision", "router": "topk", "test_acc": 0.5, "metric": "test_acc", "higher_is_better": True}
        if analysis:
            m["analysis"] = analysis
        (d / "metrics.json").write_text(json.dumps(m))
    runs, problems = scan([tmp_path])
    text = report(runs, problems=problems)
    section = text.split("## Routing analyses", 1)[1]
    assert "position 0.360" in section and "0.75 (3)" in section and "0.000 → 0.350" in section
    assert "0.060 [0.125]" in section and section.count("| vision |") == 1  # run b has no analyses
    assert "## Routing analyses" not in report([r for r in runs if "analysis" not in r])


def test_capacity_bound_is_locmoes_formula_on_the_recorded_angle():
    from core.routers.locmoe import capacity_lower_bound

    torch.manual_seed(0)
    D, E, S = 8, 4, 6
    layer = MoE(D, 8, num_experts=E, router=functools.partial(TopKRouter, top_k=1, capacity_factor=2.0,
                                                              noise_std=0.0))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(D)[:E])  # orthonormal gate vectors
    on_gates = torch.eye(D)[[0, 1, 2, 3, 0, 1]][None] * 5.0  # every token is its expert's gate vector
    with analytics.RoutingCapture(layer, collapse=True) as rec:
        layer(on_gates)
        bound = rec.summary()[""]["capacity_bound"]
    assert bound["max_angle"] == pytest.approx(0.0, abs=1e-3) and bound["lower_bound"] == 0
    assert bound["router_capacity"] == layer.router.capacity(S) and bound["group_size"] == S
    tilted = on_gates + torch.zeros(D).index_fill(0, torch.tensor([6]), 5.0)  # 45° off every gate
    with analytics.RoutingCapture(layer, collapse=True) as rec:
        layer(tilted)
        bound = rec.summary()[""]["capacity_bound"]
    assert bound["max_angle"] == pytest.approx(math.pi / 4, abs=1e-4)
    assert bound["lower_bound"] == capacity_lower_bound(S, D, math.pi / 4) > 0
