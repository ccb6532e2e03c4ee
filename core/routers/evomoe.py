"""EvoMoE's dense-to-sparse gate (Nie, Miao, Cao, Ma, Li, Zhang, Fu, Cui, "EvoMoE: An Evolutional
Mixture-of-Experts Training Framework via Dense-To-Sparse Gate", arXiv 2112.14397, 2021).

During the first ``anneal_steps`` optimizer steps (the schedule), at step t:

- temperature ``τ_t = τ_0 · (τ_1/τ_0)^(t/anneal_steps)`` (exponential decay from ``tau_start`` to
  ``tau_end``);
- gate ``g = softmax((x W + γ)/τ_t)`` with Gumbel noise ``γ ~ Gumbel(0, 1)`` in training only;
- a token uses every expert with ``g_e ≥ threshold`` (its top-1 always): at a high temperature the
  gate is nearly uniform and all experts pass (dense), and fewer pass as τ falls;
- combine weights ``g_e`` at the used experts; dropless.

From step ``anneal_steps`` on, the router is exactly ``TopKRouter`` with the same weight: top-K of
``softmax(x W)`` (noise ``noise_std``, 0 by default), buffers of ``C = ceil(S·K·cf/E)`` slots
(``capacity_factor=None``: dropless), its balance losses. EvoMoE ends at top-1 (``top_k: 1``).

The step: a persistent buffer counts optimizer steps; ``after_optimizer_step()`` (called by the
training engine after every optimizer step, ``core.after_optimizer_step``, as for DeepSeek's bias)
advances it. A training loop outside the engine calls ``core.after_optimizer_step(model)`` itself.
Checkpoints carry the step, so a resumed run continues the schedule.

Legend: G groups, S tokens per group, D width, E experts, K experts per token at the end.
"""

from __future__ import annotations

import torch

from core.routers.base import check_finite, check_positive_int, select_token_choice
from core.routers.topk import TopKRouter
from core.routing import Routing


class EvoMoERouter(TopKRouter):
    """Dense-to-sparse gate annealed over ``anneal_steps`` optimizer steps, then top-K.

    Args:
        dim: D.
        num_experts: E.
        top_k: K experts per token once the schedule has ended.
        capacity_factor: cf of the sparse phase, or None (dropless); the dense phase never drops.
        anneal_steps: length of the schedule in optimizer steps (>= 1).
        tau_start, tau_end: temperature at the first and last step of the schedule (> 0).
        threshold: gate value an expert needs during the schedule (0 <= threshold < 1).
        noise_std, importance_loss_weight, load_loss_weight, switch_loss_weight: as ``TopKRouter``
            (the balance losses apply in both phases, on ``softmax(x W)``).
    """

    family = "dense-to-sparse"

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, capacity_factor: float | None = None,
                 anneal_steps: int = 1000, tau_start: float = 2.0, tau_end: float = 0.3, threshold: float = 0.001,
                 noise_std: float = 0.0, importance_loss_weight: float = 0.0, load_loss_weight: float = 0.0,
                 switch_loss_weight: float = 0.01):
        super().__init__(dim, num_experts, top_k=top_k, capacity_factor=capacity_factor, noise_std=noise_std,
                         importance_loss_weight=importance_loss_weight, load_loss_weight=load_loss_weight,
                         switch_loss_weight=switch_loss_weight)
        self.anneal_steps = check_positive_int("anneal_steps", anneal_steps)
        check_finite("tau_start", tau_start, gt=0)
        check_finite("tau_end", tau_end, gt=0)
        check_finite("threshold", threshold, ge=0)
        if threshold >= 1:
            raise ValueError(f"threshold={threshold} is not allowed: it must be < 1 (no gate value reaches 1 "
                             "with more than one expert).")
        self.tau_start, self.tau_end, self.threshold = float(tau_start), float(tau_end), float(threshold)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def temperature(self) -> float:
        """τ at the current step (``tau_end`` once the schedule is over)."""
        t = min(int(self.step), self.anneal_steps) / self.anneal_steps
        return self.tau_start * (self.tau_end / self.tau_start) ** t

    @property
    def annealed(self) -> bool:
        return int(self.step) >= self.anneal_steps

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        if self.annealed:
            return super().forward(x_GSD, mask_GS)
        logits_GSE = self.linear_logits(x_GSD, self.weight)
        noisy_GSE = logits_GSE
        if self.training:  # Gumbel(0, 1) = −log(−log U)
            u_GSE = torch.rand_like(logits_GSE).clamp(1e-10, 1.0 - 1e-7)
            noisy_GSE = logits_GSE - torch.log(-torch.log(u_GSE))
        gates_GSE = torch.softmax(noisy_GSE / self.temperature(), dim=-1)
        top1_GSE = gates_GSE == gates_GSE.max(-1, keepdim=True).values
        eligible_GSE = (gates_GSE >= self.threshold) | top1_GSE
        routing = select_token_choice(gates_GSE, gates_GSE, self.num_experts, None, mask_GS=mask_GS,
                                      eligible_GSE=eligible_GSE)
        routing.extras["choices_T"] = eligible_GSE.sum(-1).reshape(-1)  # experts each token uses
        self.aux_losses = self._aux_losses(logits_GSE, logits_GSE, torch.softmax(logits_GSE, -1), mask_GS) \
            if self.training else {}
        return routing

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """One more optimizer step of the schedule."""
        self.step += 1

