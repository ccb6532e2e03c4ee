"""DS-MoE: dense training, sparse inference (Pan, Shen, Zhang, Zhang, Tan, Li, Panda, Tan, Wang,
"Dense Training, Sparse Inference: Rethinking Training of Mixture-of-Experts Language Models",
arXiv 2404.05567, 2024).

- gate ``p = softmax(x W / t)``;
- training: every token goes to all E experts with weight ``p_e`` (``DenseRouter``), so every expert
  receives every token's gradient;
- evaluation: each token keeps at most K experts, its top-K by ``p`` (``threshold=null``), or those
  of its top-K with ``p_e ≥ threshold`` (the paper's threshold rule; the token's top-1 is always
  kept); weights are the kept ``p_e`` (divided by their sum with ``renormalize``); dropless;
- mutual-information loss that makes the dense gate ready for sparse use (balanced over the group,
  confident per token): ``L_MI = α · (mean_s H(p_s) + log E − H(mean_s p_s))``, i.e. the negative
  mutual information between tokens and experts up to the constant ``log E``
  (``core.losses.local_entropy_loss`` + ``global_entropy_loss``).

Token-local and dropless in both modes, hence causal.

Legend: G groups, S tokens per group, D width, E experts, K experts per token at evaluation.
"""

from __future__ import annotations

import math

import torch

from core import losses
from core.routers.base import check_bool, check_finite, check_positive_int, select_token_choice
from core.routers.dense import DenseRouter
from core.routing import Routing


class DSMoERouter(DenseRouter):
    """All experts in training, at most K per token at evaluation.

    Args:
        dim: D.
        num_experts: E.
        top_k: K, the most experts a token uses at evaluation (1 <= K <= E).
        threshold: at evaluation keep only choices with gate >= threshold (None: plain top-K).
        renormalize: divide the kept evaluation gates by their sum.
        temperature: softmax temperature (> 0).
        mi_loss_weight: α of the mutual-information loss (0 turns it off).
    """

    family = "dense-to-sparse"

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, threshold: float | None = None,
                 renormalize: bool = False, temperature: float = 1.0, mi_loss_weight: float = 0.01):
        super().__init__(dim, num_experts, temperature=temperature)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is not allowed: it must be <= num_experts={num_experts}.")
        if threshold is not None:
            check_finite("threshold", threshold, ge=0)
        check_finite("mi_loss_weight", mi_loss_weight, ge=0)
        self.top_k, self.threshold = top_k, threshold
        self.renormalize = check_bool("renormalize", renormalize)
        self.mi_loss_weight = mi_loss_weight

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        if self.training:
            routing = super().forward(x_GSD, mask_GS)
            if self.mi_loss_weight:
                p_GSE = routing.scores_GSE
                self.aux_losses = {"mutual_information": self.mi_loss_weight * (
                    losses.local_entropy_loss(p_GSE, mask_GS)
                    + losses.global_entropy_loss(p_GSE, mask_GS, threshold=math.log(self.num_experts)))}
            return routing
        probs_GSE = torch.softmax(self.linear_logits(x_GSD, self.weight) / self.temperature, dim=-1)
        gates_GSE = probs_GSE
        eligible_GSE = None
        if self.threshold is not None:
            top1_GSE = gates_GSE == gates_GSE.max(-1, keepdim=True).values
            eligible_GSE = (gates_GSE >= self.threshold) | top1_GSE
        self.aux_losses = {}
        if self.renormalize:  # over the kept choices: the K largest, less those under the threshold
            kept_GSE = torch.zeros_like(gates_GSE).scatter(-1, gates_GSE.topk(self.top_k, -1).indices, 1.0)
            if eligible_GSE is not None:
                kept_GSE = kept_GSE * eligible_GSE
            gates_GSE = gates_GSE / (gates_GSE * kept_GSE).sum(-1, keepdim=True)
        routing = select_token_choice(probs_GSE, gates_GSE, self.top_k, None, mask_GS=mask_GS,
                                      scores_GSE=probs_GSE, eligible_GSE=eligible_GSE)
        if eligible_GSE is not None:  # tokens use different numbers of experts
            routing.extras["choices_T"] = eligible_GSE.sum(-1).clamp(max=self.top_k).reshape(-1)
        return routing
