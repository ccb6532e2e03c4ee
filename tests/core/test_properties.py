"""Property tests (hypothesis) of every ``conf/router/*.yaml``: random group counts and sizes
(single-token groups included), expert counts, K, capacity factors, train/eval mode and padding masks
(random, whole groups padded, everything padded); every routing must satisfy the invariants of
``tests/core/test_routers.py`` (indices in range, weights finite and >= 0, capacity respected, no
assignment to a padded token, soft/merged/plan marginals), and training losses must be finite.

A drawn combination that a router refuses at construction (``top_k`` > E, expert choice without a
capacity factor, an expert-group count that does not divide E, ...) or that BASE layers refuse in
training (a group size that is not a multiple of E) is discarded: those are config errors, refused
with a clear message before training (``tests/test_validation.py``).

The default run draws 25 cases per router; ``-m slow`` runs 400 per router.
"""

from __future__ import annotations

import inspect

import hydra
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import router_config
from tests.core.test_routers import D, _route, check_routing

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                       HealthCheck.filter_too_much])
SLOW = settings(FAST, max_examples=400)


@st.composite
def routing_cases(draw):
    E = draw(st.integers(1, 8))
    G = draw(st.integers(1, 4))
    S = draw(st.sampled_from([1, 1, 2, 3, E, 2 * E, 7, 16, 24]))  # single-token groups and multiples of E
    return {
        "E": E, "G": G, "S": max(1, S),
        "top_k": draw(st.integers(1, E)),
        "capacity_factor": draw(st.one_of(st.none(), st.floats(0.05, 4.0), st.sampled_from([1.0, 1.05, 2.0]))),
        "mask": draw(st.sampled_from(["none", "random", "padded_group", "all_padded", "first_only"])),
        "train": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _mask(kind: str, G: int, S: int, g: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.rand(G, S, generator=g) > 0.5
    if kind == "padded_group":
        mask[torch.randint(0, G, (1,), generator=g)] = False
    elif kind == "all_padded":
        mask[:] = False
    elif kind == "first_only":  # one real token per group
        mask[:] = False
        mask[:, 0] = True
    return mask


def _build(name: str, case: dict):
    """The router of ``conf/router/<name>.yaml`` with the drawn K and capacity factor where it has them."""
    partial = hydra.utils.instantiate(router_config(name))
    params = inspect.signature(partial.func).parameters
    kwargs = {k: case[k] for k in ("top_k", "capacity_factor") if k in params}
    try:
        return partial(dim=D, num_experts=case["E"], **kwargs)
    except ValueError:
        assume(False)  # a refused config: see the module docstring


def _check_case(name: str, case: dict) -> None:
    router = _build(name, case).train(case["train"])
    G, S, E = case["G"], case["S"], case["E"]
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])  # training noise
    x = torch.randn(G, S, D, generator=g)
    mask = _mask(case["mask"], G, S, g)
    ids = torch.randint(0, 50, (G, S), generator=g)
    try:
        routing = _route(router, x, mask, ids)
    except ValueError as err:
        assume(not ("BASE" in str(err) and S % E))  # BASE layers: S must be a multiple of E in training
        raise
    check_routing(routing, router, G, S, E, mask)
    if case["train"]:
        for loss_name, value in router.aux_losses.items():
            assert value.dim() == 0 and torch.isfinite(value), loss_name


@FAST
@given(case=routing_cases())
def test_router_invariants_hold_on_random_shapes_and_masks(router_name, case):
    _check_case(router_name, case)


@pytest.mark.slow
@SLOW
@given(case=routing_cases())
def test_router_invariants_hold_on_many_random_cases(router_name, case):
    _check_case(router_name, case)
