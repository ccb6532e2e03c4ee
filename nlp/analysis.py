"""The routing analyses of a trained language model (docs/routers.md §5), written to ``analysis.json``.

They are ``core.analytics``' analyses of every domain (``analyse_routing``, ``RoutingSnapshots``),
run by ``core.run`` when ``analysis.enabled``; in nlp a token's label is its token id:

- drop rate by position in the sequence, without and with Batch Prioritized Routing (OpenMoE's
  "drop towards the end"; Xue et al. 2024), at the router's own capacity or, for dropless routers,
  at ``analysis.capacity_factor``;
- the share of routing explained by the token id, ``1 − H(expert | token id) / H(expert)``, and the
  token-id specialisation ``Σ_v n_v max_e q_v(e) / Σ_v n_v`` (OpenMoE's context-independent
  specialisation);
- routing stability: for early snapshots taken during training, the count-weighted share of token
  ids whose most frequent top-1 expert equals the final one (OpenMoE's early routing learning);
- representation collapse (X-MoE, Chi et al. 2022): the share of the routed tokens' variance in the
  span of the gate vectors, and their effective rank;
- for AdaMoE (null experts), the mean number of true experts per token and the expert-FLOP ratio to
  top-``analysis.baseline_top_k`` routing.
"""

from __future__ import annotations

from core.analytics import RoutingSnapshots, analyse_routing, analysis_summary, plain, record_routing

__all__ = ["RoutingSnapshots", "analyse_routing", "analysis_summary", "plain", "record_routing"]
