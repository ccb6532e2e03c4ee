"""Switch routing (Fedus, Zoph, Shazeer, "Switch Transformers", JMLR 2022): top-1 softmax token
choice, ``y = p_{i*}(x)·f_{i*}(x)`` with the selected (not renormalised) probability as gate, expert
capacity ``C = ceil(S·cf/E)`` (overflow is dropped and the residual carries it), and the Switch
load-balance loss ``α·E·Σ_e f_e P_e`` with α = 1e-2; the ST-MoE router z-loss (Zoph et al. 2022,
c_z = 1e-3) is optional.

Legend: G groups, S tokens per group, D width, E experts.
"""

from __future__ import annotations

from core.routers.topk import TopKRouter


class SwitchRouter(TopKRouter):
    """Top-1 token choice with the Switch loss: ``TopKRouter`` with K = 1 and Switch defaults.

    Args:
        dim: D.
        num_experts: E.
        capacity_factor: cf > 0 (Switch trains at 1.0–1.25), or None for dropless routing.
        capacity_multiple_of: round C up to a multiple of this.
        batch_priority: Batch Prioritized Routing (off in Switch).
        noise_std: Gaussian logit noise in training, σ = noise_std / E (0 in Switch).
        switch_loss_weight: α of the load-balance loss (1e-2).
        z_loss_weight: c_z of the router z-loss (0 = off; ST-MoE uses 1e-3).
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: float | None = 1.25,
                 capacity_multiple_of: int = 1, batch_priority: bool = False, noise_std: float = 0.0,
                 switch_loss_weight: float = 1e-2, z_loss_weight: float = 0.0):
        super().__init__(dim, num_experts, top_k=1, capacity_factor=capacity_factor,
                         capacity_multiple_of=capacity_multiple_of, batch_priority=batch_priority,
                         noise_std=noise_std, renormalize=False, importance_loss_weight=0.0,
                         load_loss_weight=0.0, switch_loss_weight=switch_loss_weight,
                         z_loss_weight=z_loss_weight)
