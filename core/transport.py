"""Transport plans that decide routing in the router study (Liu, Blondel, Riquelme, Puigcerver, TMLR
2024): the entropic (Sinkhorn) plan of ``exp(z)``, and the sparsity-constrained squared-ℓ2 plan of
``softmax(z)`` (Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", ICLR 2023),
solved in the semi-dual with Adam as google-research/vmoe does.

Marginals: token rows sum to 1 and expert columns to S_valid/E. Plans only select; no gradient flows
through them (combine gates come from the softmax).

Legend: G groups, S tokens per group, E experts.
"""

from __future__ import annotations

import torch


def _valid_counts(mask_GS: torch.Tensor | None, G: int, S: int, device) -> torch.Tensor:
    if mask_GS is None:
        return torch.full((G,), float(S), device=device)
    return mask_GS.sum(1).float()


@torch.no_grad()
def sinkhorn_plan(logits_GSE: torch.Tensor, mask_GS: torch.Tensor | None = None, num_iters: int = 20) -> torch.Tensor:
    """``argmin KL(P ‖ exp(z))`` over plans with rows 1 and columns S/E, by ``num_iters`` log-domain
    Sinkhorn iterations (ε = 1), each scaling expert columns then token rows: rows end exact,
    columns approximate. Masked rows are zero."""
    G, S, E = logits_GSE.shape
    log_p = logits_GSE.float()
    invalid_GS1 = None
    if mask_GS is not None:
        invalid_GS1 = ~mask_GS[..., None]
        log_p = log_p.masked_fill(invalid_GS1, float("-inf"))
    log_col = torch.log(_valid_counts(mask_GS, G, S, logits_GSE.device) / E)[:, None, None]
    for _ in range(num_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + log_col
        log_p = log_p - torch.logsumexp(log_p, dim=2, keepdim=True)
        if invalid_GS1 is not None:  # keep padded rows at -inf (0 - 0 would give NaN)
            log_p = log_p.masked_fill(invalid_GS1, float("-inf"))
    return log_p.exp()


def project_ksparse_simplex(x: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean projection of each row (last dim) onto {p ≥ 0, Σp = 1, ‖p‖₀ ≤ k}: keep the top-k
    entries, then project them onto the simplex (Kyrillidis et al., ICML 2013)."""
    k = min(k, x.shape[-1])
    top, idx = torch.topk(x, k, dim=-1)
    cssv = top.cumsum(-1) - 1.0
    ind = torch.arange(1, k + 1, device=x.device, dtype=x.dtype)
    rho = ((top - cssv / ind) > 0).sum(-1, keepdim=True).clamp_min(1)
    tau = cssv.gather(-1, rho - 1) / rho
    return torch.zeros_like(x).scatter(-1, idx, (top - tau).clamp_min(0))


@torch.no_grad()
def ksparse_plan(
    probs_GSE: torch.Tensor,
    k: int,
    sparse_rows: bool,
    mask_GS: torch.Tensor | None = None,
    num_steps: int = 20,
    lr: float = 1e-2,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Squared-ℓ2 regularised transport of the similarity ``probs`` with at most k nonzeros per
    expert column (``sparse_rows=False``, expert choice) or per token row (``sparse_rows=True``,
    token choice). The sparse side's marginal is exact; the other is reached approximately by
    ``num_steps`` Adam steps on the semi-dual potentials (vmoe: 20 steps, lr 1e-2)."""
    G, S, E = probs_GSE.shape
    sim_GSE = probs_GSE.float()
    n_valid_G = _valid_counts(mask_GS, G, S, probs_GSE.device)
    col_G11 = (n_valid_G / E)[:, None, None]
    if mask_GS is not None:
        sim_GSE = sim_GSE.masked_fill(~mask_GS[..., None], -1e4)
    if sparse_rows:  # rows (tokens) sum to exactly 1; potentials on columns, target S/E
        b = torch.ones_like(col_G11)
        potential = torch.zeros(G, 1, E, device=sim_GSE.device)
        target = col_G11.expand(G, 1, E)
        reduce_dim = 1
    else:  # columns (experts) sum to exactly S/E; potentials on rows, target 1
        b = col_G11
        potential = torch.zeros(G, S, 1, device=sim_GSE.device)
        target = torch.ones(G, S, 1, device=sim_GSE.device)
        if mask_GS is not None:
            target = target * mask_GS[..., None]
        reduce_dim = 2

    def plan(pot):
        x = (pot + sim_GSE) / (gamma * b)
        if sparse_rows:
            return b * project_ksparse_simplex(x, k)
        return b * project_ksparse_simplex(x.transpose(1, 2), k).transpose(1, 2)

    m = torch.zeros_like(potential)
    v = torch.zeros_like(potential)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, num_steps + 1):
        grad = plan(potential).sum(reduce_dim, keepdim=True) - target  # Danskin: ∇ of the semi-dual
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad.square()
        potential = potential - lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    p = plan(potential)
    if mask_GS is not None:
        p = p.masked_fill(~mask_GS[..., None], 0.0)
    return p
