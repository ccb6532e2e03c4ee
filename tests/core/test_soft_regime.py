"""Soft MoE's regime options (issue 24's diagnosis): with the reference's l2 normalisation and a logit
scale starting at 1, each slot starts as nearly the group's mean token; ``scale_init`` and
``normalize=false`` (the paper's Algorithm 1) leave that regime. The defaults keep the reference."""

from __future__ import annotations

import pytest
import torch

from core.checks import ConfigError
from core.routers.soft import SoftRouter

D, E, S = 32, 4, 49


def _tokens_per_slot(router: SoftRouter, x: torch.Tensor) -> torch.Tensor:
    """The effective number of tokens a slot mixes, 1 / Σ_s w_s² (S when uniform, 1 when one token)."""
    w_GSEP = router(x).dispatch_GSEP
    return 1.0 / w_GSEP.square().sum(1)


def test_defaults_are_the_reference_formula():
    torch.manual_seed(0)
    router, x = SoftRouter(D, E), torch.randn(2, S, D)
    xn = x / x.norm(dim=-1, keepdim=True)
    phin = router.phi_DEP / router.phi_DEP.norm(dim=0, keepdim=True)
    expected = torch.softmax(torch.einsum("gsd,dep->gsep", xn, phin), dim=1)
    assert router.normalize and router.scale.item() == 1.0
    torch.testing.assert_close(router(x).dispatch_GSEP, expected, atol=1e-5, rtol=1e-4)


def test_without_normalisation_the_logits_are_plain_dot_products():
    torch.manual_seed(0)
    router, x = SoftRouter(D, E, normalize=False, scale_init=2.0), torch.randn(2, S, D)
    logits = 2.0 * torch.einsum("gsd,dep->gsep", x, router.phi_DEP)
    torch.testing.assert_close(router(x).dispatch_GSEP, torch.softmax(logits, dim=1))
    torch.testing.assert_close(router(x).combine_GSEP, torch.softmax(logits.reshape(2, S, E), -1).reshape(2, S, E, 1))


def test_scale_one_mixes_nearly_every_token_and_scale_ten_does_not():
    torch.manual_seed(0)
    x = torch.randn(4, S, D)
    mean_token = _tokens_per_slot(SoftRouter(D, E), x).mean().item()
    sharp = _tokens_per_slot(SoftRouter(D, E, scale_init=10.0), x).mean().item()
    plain = _tokens_per_slot(SoftRouter(D, E, normalize=False), x).mean().item()
    assert mean_token > 0.9 * S, mean_token      # each slot is nearly the group's mean token
    assert sharp < 0.5 * S and plain < 0.5 * S, (sharp, plain)


@pytest.mark.parametrize("kwargs", [dict(scale_init=0.0), dict(scale_init=float("inf")), dict(normalize="no")])
def test_bad_regime_options_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SoftRouter(D, E, **kwargs)
