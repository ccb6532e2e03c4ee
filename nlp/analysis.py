"""The routing analyses of a trained language model (ROUTERS.md §5), written to ``analysis.json``:

- drop rate by position in the sequence, without and with Batch Prioritized Routing (OpenMoE's
  "drop towards the end"; Xue et al. 2024), at the router's own capacity or, for dropless routers,
  at ``analysis.capacity_factor``;
- the share of routing explained by the token id, ``1 − H(expert | token id) / H(expert)``, and the
  token-id specialisation ``Σ_v n_v max_e q_v(e) / Σ_v n_v`` (OpenMoE's context-independent
  specialisation);
- routing stability: for early snapshots taken during training (``RoutingSnapshots``, an engine
  callback), the count-weighted share of token ids whose most frequent top-1 expert equals the final
  one (OpenMoE's early routing learning);
- for AdaMoE (null experts), the mean number of true experts per token and the expert-FLOP ratio to
  top-``analysis.baseline_top_k`` routing.

What a router offers is read off its attributes (``capacity_factor``, ``batch_priority``,
``num_null_experts``), never its name.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from core.analytics import RoutingRecorder, stability_from_counts
from core.distributed import is_main_process
from core.engine import Callback
from core.moe import MoE

__all__ = ["RoutingSnapshots", "analyse_routing", "analysis_summary", "record_routing"]


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


class _RoutingCapture:
    """Context: eval mode, no routing statistics, a ``core.analytics.RoutingRecorder`` on every MoE
    layer (labels = the token ids each layer receives); router attributes may be changed for the
    duration (capacity factor and BPR for the drop-rate analysis)."""

    def __init__(self, model: nn.Module, min_count: int = 1, **router_attrs):
        self.model, self.min_count, self.router_attrs = model, min_count, router_attrs

    def __enter__(self) -> RoutingRecorder:
        self.was_training = self.model.training
        self.saved = []
        for m in _moe_layers(self.model):
            self.saved.append((m, m.track_stats, {k: getattr(m.router, k) for k in self.router_attrs}))
            m.track_stats = False
            for k, v in self.router_attrs.items():
                setattr(m.router, k, v)
        self.model.eval()
        self.recorder = RoutingRecorder(self.model, min_count=self.min_count)
        return self.recorder

    def __exit__(self, *exc):
        self.recorder.close()
        for m, track, old in self.saved:
            m.track_stats, m.last_routing = track, None
            for k, v in old.items():
                setattr(m.router, k, v)
        self.model.train(self.was_training)
        return False


@torch.no_grad()
def record_routing(model: nn.Module, loader, max_batches: int, min_count: int = 1,
                   **router_attrs) -> list[dict]:
    """Per MoE layer, ``RoutingRecorder``'s summary over the first ``max_batches`` batches:
    drop rate by position, experts per token, token-id specialisation and the (token id × top
    expert) counts ``counts_LE``."""
    device = next(model.parameters()).device
    with _RoutingCapture(model, min_count, **router_attrs) as rec:
        for i, (x_BT, _) in enumerate(loader):
            if i >= max_batches:
                break
            model(x_BT.to(device))
        summary = rec.summary()
    return list(summary.values())


def _drop_summary(layers: list[dict]) -> dict | None:
    """Drop rate by position averaged over layers: per position, and in the first and last quarter."""
    rates = [r["drop_rate_by_position"] for r in layers if "drop_rate_by_position" in r]
    if not rates:
        return None
    mean_S = torch.tensor(rates, dtype=torch.float64).nanmean(0)
    q = max(1, mean_S.numel() // 4)
    return {"per_position": mean_S.tolist(), "per_layer": rates, "mean": float(mean_S.nanmean()),
            "first_quarter": float(mean_S[:q].nanmean()), "last_quarter": float(mean_S[-q:].nanmean())}


def analyse_routing(model: nn.Module, loader, analysis_cfg, snapshots: dict | None = None) -> dict:
    """The routing analyses of a trained model (see the module docstring)."""
    a = analysis_cfg
    moes = _moe_layers(model)
    if not moes:
        return {}
    router = moes[0].router
    layers = record_routing(model, loader, a.max_batches, a.min_token_count)
    out: dict = {"experts_per_token_layers": [r.get("experts_per_token") for r in layers]}
    spec = [r.get("specialisation") for r in layers]
    if all(s is not None for s in spec):
        out["specialisation_layers"] = spec
        out["explained_by_token_id"] = _mean([s["share"] for s in spec])
        out["token_id_purity"] = _mean([s["purity"] for s in spec])
        out["uniform_purity"] = 1.0 / router.num_experts
    if snapshots:
        final = [r["counts_LE"] for r in layers]
        out["stability"] = {}
        for step, snap in sorted(snapshots.items()):
            agree = [stability_from_counts(s, f, a.min_token_count, weighted=True) for s, f in zip(snap, final)]
            out["stability"][str(step)] = {"agreement": _mean(agree), "agreement_layers": agree}
    if hasattr(router, "capacity_factor"):
        cf = router.capacity_factor if router.capacity_factor is not None else a.capacity_factor
        drops: dict = {"capacity_factor": cf, "router_capacity_factor": router.capacity_factor}
        variants = {"no_bpr": {"capacity_factor": cf}}
        if hasattr(router, "batch_priority"):
            variants = {"no_bpr": {"capacity_factor": cf, "batch_priority": False},
                        "bpr": {"capacity_factor": cf, "batch_priority": True}}
        for key, attrs in variants.items():
            summary = _drop_summary(record_routing(model, loader, a.max_batches, a.min_token_count, **attrs))
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
    return out


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


class RoutingSnapshots(Callback):
    """Records the (token id × top expert) counts of every MoE layer before the chosen training steps,
    for the routing-stability analysis. Snapshots are saved in the run directory, so a resumed run
    keeps the ones taken before it was killed.

    Args:
        steps: the optimizer steps before which to record.
        loader: the batches to route (the validation loader).
        max_batches: how many of them.
        out_dir: the run directory (``routing_snapshots.pt``).
    """

    def __init__(self, steps: list[int], loader, max_batches: int, out_dir: Path):
        self.steps, self.loader, self.max_batches = set(steps), loader, max_batches
        self.path = Path(out_dir) / "routing_snapshots.pt"
        self.snapshots: dict = torch.load(self.path) if self.path.exists() else {}

    def on_step_start(self, trainer, model, state) -> None:
        if state.step in self.steps and state.step not in self.snapshots:
            layers = record_routing(model, self.loader, self.max_batches)
            self.snapshots[state.step] = [r["counts_LE"] for r in layers]
            if is_main_process():  # under torchrun every rank records the same snapshot
                tmp = self.path.with_name(self.path.name + ".tmp")
                torch.save(self.snapshots, tmp)
                tmp.replace(self.path)


def plain(v):
    return v.tolist() if torch.is_tensor(v) else str(v)


def analysis_summary(analysis: dict) -> dict:
    """The scalar part of ``analysis.json``, for ``metrics.json``."""
    out = {k: analysis.get(k) for k in ("explained_by_token_id", "token_id_purity", "uniform_purity")}
    if "stability" in analysis:
        out["routing_agreement"] = {step: v["agreement"] for step, v in analysis["stability"].items()}
    drops = analysis.get("drop_rate_by_position")
    if drops:
        out["drop_capacity_factor"] = drops["capacity_factor"]
        for key in ("no_bpr", "bpr"):
            if key in drops:
                out[f"drop_rate_{key}"] = {k: drops[key][k] for k in ("mean", "first_quarter", "last_quarter")}
    if "null_experts" in analysis:
        out["true_experts_per_token"] = analysis["null_experts"]["true_experts_per_token"]
        out["expert_flop_ratio_to_baseline"] = analysis["null_experts"]["expert_flop_ratio_to_baseline"]
    return out
