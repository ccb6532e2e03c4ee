"""Auxiliary routing losses. Every loss is computed per routing group, then averaged over groups.

Legend: G groups, S tokens per group, E experts, K experts per token. ``mask_GS`` marks valid tokens
(False: padding, or tokens of another modality); masked tokens never count.

Without tokens every loss is 0, never NaN: a group whose tokens are all masked (or S = 0) adds 0 to
the mean over groups (there is nothing to balance), and G = 0 groups give 0.

Sources: importance and load losses, V-MoE (Riquelme et al., NeurIPS 2021); Switch load balance
(Fedus et al., JMLR 2022); GShard balance (Lepikhin et al., ICLR 2021); router z-loss, ST-MoE
(Zoph et al., 2022); local/global entropy losses, LIMoE (Mustafa et al., NeurIPS 2022); AdaMoE's
null-aware load balance (Zeng et al., Findings of EMNLP 2024).
"""

from __future__ import annotations

import math

import torch


def _group_mean(v_G: torch.Tensor) -> torch.Tensor:
    """Mean over groups; 0 (still in the graph) when there are none, where ``.mean()`` gives NaN."""
    return v_G.mean() if v_G.shape[0] else v_G.sum()


def _mask(mask_GS: torch.Tensor | None, like_GSE: torch.Tensor) -> torch.Tensor:
    if mask_GS is None:
        return torch.ones(like_GSE.shape[:2], dtype=like_GSE.dtype, device=like_GSE.device)
    return mask_GS.to(like_GSE.dtype)


def _cv_squared(v_GE: torch.Tensor) -> torch.Tensor:
    """(std/mean)² along E with population std; 0 for an all-zero row (empty group)."""
    if v_GE.shape[0] == 0:  # no groups: nothing to balance (var() would warn about 0 elements)
        return v_GE.sum(-1)
    mean = v_GE.mean(-1)
    var = v_GE.var(-1, correction=0)
    return torch.where(mean > 0, var / mean.clamp_min(1e-20).square(), torch.zeros_like(mean))


def importance_loss(probs_GSE: torch.Tensor, mask_GS: torch.Tensor | None = None) -> torch.Tensor:
    """V-MoE importance loss: ``imp_e = Σ_s p[s,e]``, ``L = (std(imp)/mean(imp))²``, mean over groups."""
    m_GS = _mask(mask_GS, probs_GSE)
    importance_GE = (probs_GSE * m_GS[..., None]).sum(1)
    return _group_mean(_cv_squared(importance_GE))


def load_loss(
    logits_GSE: torch.Tensor,
    noisy_logits_GSE: torch.Tensor,
    noise_std: float,
    k: int,
    mask_GS: torch.Tensor | None = None,
) -> torch.Tensor:
    """V-MoE load loss: the probability that expert e is still among the top-K if only its own
    noise were redrawn, ``P[s,e] = 1 − Φ((thr_s − z[s,e])/σ)`` with ``thr_s`` the K-th largest noisy
    logit; ``load_e = mean_s P[s,e]``; ``L = (std(load)/mean(load))²``."""
    threshold_GS1 = torch.topk(noisy_logits_GSE, k, dim=-1).values[..., -1:]
    p_GSE = 1.0 - torch.special.ndtr((threshold_GS1 - logits_GSE) / noise_std)
    m_GS = _mask(mask_GS, p_GSE)
    load_GE = (p_GSE * m_GS[..., None]).sum(1) / m_GS.sum(1, keepdim=True).clamp_min(1.0)
    return _group_mean(_cv_squared(load_GE))


def switch_loss(
    probs_GSE: torch.Tensor, expert_idx_GSK: torch.Tensor, mask_GS: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer balance loss ``E · Σ_e f_e P_e`` (1.0 at uniform routing; callers scale
    it by α = 1e-2). f_e: fraction of routed choices sent to e; P_e: mean router probability."""
    E = probs_GSE.shape[-1]
    m_GS = _mask(mask_GS, probs_GSE)
    n_GS1 = m_GS.sum(1, keepdim=True).clamp_min(1.0)
    onehot_GSE = torch.zeros_like(probs_GSE).scatter_add_(
        -1, expert_idx_GSK, torch.ones_like(expert_idx_GSK, dtype=probs_GSE.dtype)
    )
    K = expert_idx_GSK.shape[-1]
    f_GE = (onehot_GSE * m_GS[..., None]).sum(1) / (n_GS1 * K)
    P_GE = (probs_GSE * m_GS[..., None]).sum(1) / n_GS1
    return _group_mean(E * (f_GE * P_GE).sum(-1))


def gshard_loss(probs_GSE: torch.Tensor, mask_GS: torch.Tensor | None = None) -> torch.Tensor:
    """GShard balance loss ``mean_e(mean_s top1[s,e] · mean_s p[s,e]) · E²`` (1.0 when uniform)."""
    E = probs_GSE.shape[-1]
    m_GS = _mask(mask_GS, probs_GSE)
    n_GS1 = m_GS.sum(1, keepdim=True).clamp_min(1.0)
    top1_GSE = torch.nn.functional.one_hot(probs_GSE.argmax(-1), E).to(probs_GSE.dtype)
    f_GE = (top1_GSE * m_GS[..., None]).sum(1) / n_GS1
    P_GE = (probs_GSE * m_GS[..., None]).sum(1) / n_GS1
    return _group_mean((f_GE * P_GE).mean(-1) * E * E)


def z_loss(logits_GSE: torch.Tensor, mask_GS: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_s (logsumexp_e z[s,e])²`` (callers scale it by c_z = 1e-3)."""
    m_GS = _mask(mask_GS, logits_GSE)
    lse_GS = torch.logsumexp(logits_GSE, dim=-1).square()
    return _group_mean((lse_GS * m_GS).sum(1) / m_GS.sum(1).clamp_min(1.0))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1)


def local_entropy_loss(probs_GSE: torch.Tensor, mask_GS: torch.Tensor | None = None) -> torch.Tensor:
    """LIMoE local entropy ``mean_x H(p(x))`` over the tokens in ``mask_GS`` (one modality):
    low values push each token to commit to few experts."""
    m_GS = _mask(mask_GS, probs_GSE)
    h_GS = _entropy(probs_GSE)
    return _group_mean((h_GS * m_GS).sum(1) / m_GS.sum(1).clamp_min(1.0))


def global_entropy_loss(
    probs_GSE: torch.Tensor, mask_GS: torch.Tensor | None = None, threshold: float | None = None
) -> torch.Tensor:
    """LIMoE thresholded global entropy ``max(0, τ − H(mean_x p(x)))``: the modality as a whole
    should use many experts. τ defaults to log(E) (LIMoE sets τ = log(S_min) per modality). A group
    without valid tokens adds 0."""
    E = probs_GSE.shape[-1]
    tau = math.log(E) if threshold is None else threshold
    m_GS = _mask(mask_GS, probs_GSE)
    n_G1 = m_GS.sum(1, keepdim=True)
    mean_GE = (probs_GSE * m_GS[..., None]).sum(1) / n_G1.clamp_min(1.0)
    # a group without valid tokens has no routing to spread: 0, not τ
    return _group_mean(torch.relu(tau - _entropy(mean_GE)) * (n_G1[:, 0] > 0).to(mean_GE.dtype))


def null_aware_switch_loss(
    probs_GSX: torch.Tensor,
    expert_idx_GSK: torch.Tensor,
    num_null: int,
    mask_GS: torch.Tensor | None = None,
) -> torch.Tensor:
    """AdaMoE's Switch loss over n true + m null experts, ``X · Σ_x f̂_x P_x`` with X = n + m.

    The last ``num_null`` columns of ``probs_GSX`` are null experts. Their routed fractions f are
    replaced by their mean (all null experts share one averaged bucket; Zeng et al., Findings of
    EMNLP 2024, reference code exp_1), so the loss balances the true experts and the *total* null
    usage without forcing each null expert to be used equally. 1.0 at uniform routing; callers
    scale it by ~1e-3.
    """
    X = probs_GSX.shape[-1]
    if not 0 <= num_null < X:
        raise ValueError(f"num_null={num_null} is not allowed: it must be in [0, {X - 1}].")
    m_GS = _mask(mask_GS, probs_GSX)
    n_GS1 = m_GS.sum(1, keepdim=True).clamp_min(1.0)
    onehot_GSX = torch.zeros_like(probs_GSX).scatter_add_(
        -1, expert_idx_GSK, torch.ones_like(expert_idx_GSK, dtype=probs_GSX.dtype)
    )
    f_GX = (onehot_GSX * m_GS[..., None]).sum(1) / (n_GS1 * expert_idx_GSK.shape[-1])
    if num_null:
        f_null_G1 = f_GX[:, X - num_null:].mean(-1, keepdim=True)
        f_GX = torch.cat([f_GX[:, :X - num_null], f_null_G1.expand(-1, num_null)], dim=-1)
    P_GX = (probs_GSX * m_GS[..., None]).sum(1) / n_GS1
    return _group_mean(X * (f_GX * P_GX).sum(-1))


def modality_entropy_losses(
    probs_GSE: torch.Tensor,
    modality_GS: torch.Tensor,
    num_modalities: int,
    mask_GS: torch.Tensor | None = None,
    thresholds: list[float | None] | None = None,
) -> dict[str, torch.Tensor]:
    """LIMoE's entropy losses per token group (modality): ``local_<m>`` and ``global_<m>`` for
    every modality id m in ``[0, num_modalities)`` present in ``modality_GS`` (Mustafa et al.,
    NeurIPS 2022), averaged over the groups that hold modality m. ``thresholds[m]`` is the global loss's τ for modality m (LIMoE: log of the
    smallest number of experts that modality should use; None: log E). Unweighted."""
    if thresholds is not None and len(thresholds) != num_modalities:
        raise ValueError(f"thresholds has {len(thresholds)} entries; num_modalities={num_modalities} are needed.")
    valid_GS = torch.ones_like(modality_GS, dtype=torch.bool) if mask_GS is None else mask_GS.bool()
    out: dict[str, torch.Tensor] = {}
    for m in range(num_modalities):
        m_GS = valid_GS & (modality_GS == m)
        # only groups that hold modality m: an empty group would add a constant τ to the global loss
        has_G = m_GS.any(1)
        if not bool(has_G.any()):
            continue
        tau = None if thresholds is None else thresholds[m]
        out[f"local_{m}"] = local_entropy_loss(probs_GSE[has_G], m_GS[has_G])
        out[f"global_{m}"] = global_entropy_loss(probs_GSE[has_G], m_GS[has_G], tau)
    return out
