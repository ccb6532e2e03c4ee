"""Auxiliary losses: the vmoe test vectors of docs/routers.md §2, masking, per-group averaging, and the
values each balance loss takes at uniform routing."""

from __future__ import annotations

import math

import pytest
import torch

from core import losses


pytestmark = pytest.mark.usefixtures("one_thread")

GATES = torch.tensor([[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.8, 0.2, 0.0]])
LOAD_LOGITS = torch.tensor([[0.9, 0.06, 0.04], [0.7, 0.18, 0.12], [0.85, 0.05, 0.1]])
LOAD_NOISE = torch.tensor([[-0.037, 0.026, -0.018], [-0.074, 0.045, -0.015], [-0.067, -0.059, 0.073]])


def test_importance_loss_vector():
    # population std (correction=0); the sample std would give 0.05166...
    assert losses.importance_loss(GATES[None]).item() == pytest.approx(0.03874999, abs=1e-6)


def test_gshard_loss_vector():
    assert losses.gshard_loss(GATES[None]).item() == pytest.approx(1.0875, abs=1e-6)


def test_load_loss_vector():
    value = losses.load_loss(LOAD_LOGITS[None], (LOAD_LOGITS + LOAD_NOISE)[None], 0.1, 2)
    assert value.item() == pytest.approx(0.4857386, abs=1e-6)


def _all_losses(probs_GSE, logits_GSE, mask_GS, noisy_GSE=None):
    """Every loss of core.losses on the same inputs, by name (load loss noise 0.1 unless given)."""
    idx_GSK = torch.topk(probs_GSE, 2, dim=-1).indices
    noisy = logits_GSE + 0.1 * torch.randn_like(logits_GSE) if noisy_GSE is None else noisy_GSE
    return {
        "importance": losses.importance_loss(probs_GSE, mask_GS),
        "load": losses.load_loss(logits_GSE, noisy, 0.1, 2, mask_GS),
        "switch": losses.switch_loss(probs_GSE, idx_GSK, mask_GS),
        "gshard": losses.gshard_loss(probs_GSE, mask_GS),
        "z": losses.z_loss(logits_GSE, mask_GS),
        "local_entropy": losses.local_entropy_loss(probs_GSE, mask_GS),
        "global_entropy": losses.global_entropy_loss(probs_GSE, mask_GS),
    }


def test_masked_tokens_do_not_count():
    """Appending padding tokens (any values, mask False) leaves every loss unchanged."""
    torch.manual_seed(0)
    G, S, P, E = 3, 6, 4, 5
    logits = torch.randn(G, S, E)
    pad_logits = 5 * torch.randn(G, P, E)
    mask = torch.cat([torch.ones(G, S, dtype=torch.bool), torch.zeros(G, P, dtype=torch.bool)], 1)
    noise = 0.1 * torch.randn(G, S, E)
    plain = _all_losses(logits.softmax(-1), logits, None, logits + noise)
    padded_logits = torch.cat([logits, pad_logits], 1)
    padded_noisy = torch.cat([logits + noise, pad_logits], 1)
    padded = _all_losses(padded_logits.softmax(-1), padded_logits, mask, padded_noisy)
    for name in plain:
        assert padded[name].item() == pytest.approx(plain[name].item(), rel=1e-5, abs=1e-6), name


def test_losses_average_over_groups():
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 4)
    mask = torch.rand(3, 8) > 0.3
    mask[:, 0] = True
    torch.manual_seed(1)
    together = _all_losses(logits.softmax(-1), logits, mask)
    for name in ("importance", "switch", "gshard", "z", "local_entropy", "global_entropy"):
        per_group = [
            _all_losses(logits[g:g + 1].softmax(-1), logits[g:g + 1], mask[g:g + 1])[name] for g in range(3)
        ]
        assert together[name].item() == pytest.approx(torch.stack(per_group).mean().item(), rel=1e-5), name


def test_fully_masked_group_gives_finite_zero():
    logits = torch.randn(1, 4, 3)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    for name, value in _all_losses(logits.softmax(-1), logits, mask).items():
        assert torch.isfinite(value), name
        if name in ("importance", "load", "z", "local_entropy"):
            assert value.item() == 0.0, name


def test_balance_losses_at_uniform_routing():
    E, S = 4, 8
    probs = torch.full((1, S, E), 1.0 / E)
    # every expert receives exactly S/E tokens
    idx = torch.arange(S).remainder(E).view(1, S, 1)
    assert losses.switch_loss(probs, idx).item() == pytest.approx(1.0)
    assert losses.importance_loss(probs).item() == pytest.approx(0.0, abs=1e-12)
    assert losses.local_entropy_loss(probs).item() == pytest.approx(math.log(E))
    assert losses.global_entropy_loss(probs).item() == pytest.approx(0.0, abs=1e-6)
    # GShard: mean_e(f_e·P_e)·E² with f from argmax; a balanced one-hot top-1 gives 1
    one_hot = torch.nn.functional.one_hot(idx[..., 0], E).float() * 0.5 + 0.5 / E
    assert losses.gshard_loss(one_hot).item() == pytest.approx(1.0)


def test_switch_loss_is_larger_when_collapsed():
    E, S = 4, 8
    probs = torch.zeros(1, S, E)
    probs[..., 0] = 1.0
    idx = torch.zeros(1, S, 1, dtype=torch.long)
    assert losses.switch_loss(probs, idx).item() == pytest.approx(E)
    assert losses.global_entropy_loss(probs).item() == pytest.approx(math.log(E), abs=1e-5)


def test_z_loss_formula():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]])
    lse = torch.logsumexp(logits, -1)
    expected = lse.square().mean()
    assert losses.z_loss(logits).item() == pytest.approx(expected.item())
    assert losses.z_loss(logits[:, :1]).item() == pytest.approx(math.log(4) ** 2)


def test_load_loss_has_gradient_through_clean_logits():
    logits = LOAD_LOGITS[None].clone().requires_grad_(True)
    losses.load_loss(logits, (LOAD_LOGITS + LOAD_NOISE)[None], 0.1, 2).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
