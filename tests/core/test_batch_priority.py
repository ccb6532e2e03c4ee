"""No silently ignored ``batch_priority`` (issue 24): every ``conf/router/*.yaml`` router either
honours Batch Prioritized Routing (V-MoE, Riquelme et al. 2021) — which choices are dropped at
capacity changes — or refuses the option at config time, naming the router."""

import inspect

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from core.checks import ConfigError
from core.validate import check_router
from tests.conftest import router_config

pytestmark = pytest.mark.usefixtures("one_thread")

E, S, D = 4, 64, 16


def _accepts(name: str, key: str) -> bool:
    cls = hydra.utils.get_class(router_config(name)._target_)
    return key in inspect.signature(cls).parameters


def _node(name: str, **changes):
    node = OmegaConf.create(OmegaConf.to_container(router_config(name)))
    for k, v in changes.items():
        node[k] = v
    return node


def _assignments(name: str, batch_priority: bool, x_GSD: torch.Tensor) -> tuple[set, int]:
    torch.manual_seed(0)  # the same router weights with and without BPR
    router = hydra.utils.instantiate(_node(name, batch_priority=batch_priority, capacity_factor=0.5))(
        dim=D, num_experts=E)
    router.eval()
    with torch.no_grad():
        routing = router(x_GSD)
    kept = set(zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()))
    return kept, int(routing.num_dropped)


def test_the_five_routers_of_the_issue_now_take_the_option():
    for name in ("adamoe", "gshard", "xmoe", "deepseek", "hierarchical", "topk"):
        assert _accepts(name, "batch_priority") and router_config(name).batch_priority is False, name


def test_batch_priority_changes_dropped_tokens_or_is_refused(router_name):
    x_GSD = torch.randn(2, S, D, generator=torch.Generator().manual_seed(1))
    if not _accepts(router_name, "batch_priority"):
        with pytest.raises(ConfigError, match=r"router\.batch_priority=True is not allowed: \w+Router has no such "
                                              r"parameter"):
            check_router(_node(router_name, batch_priority=True), E, domain="nlp", token_ids=True, seq_len=64)
        return
    assert _accepts(router_name, "capacity_factor"), f"{router_name}: BPR without a capacity cannot act"
    vanilla, dropped = _assignments(router_name, False, x_GSD)
    bpr, dropped_bpr = _assignments(router_name, True, x_GSD)
    assert dropped > 0 and dropped_bpr > 0  # capacity 0.5 drops choices: BPR has something to decide
    assert vanilla != bpr, f"{router_name}: the same assignments with and without batch_priority"


@pytest.mark.parametrize("name", ["adamoe", "xmoe", "deepseek", "hierarchical"])
def test_batch_priority_without_capacity_is_refused(name):
    """Dropless routers drop nothing, so BPR could change nothing: refused, naming the router."""
    assert router_config(name).capacity_factor is None  # their papers' default
    with pytest.raises(ConfigError, match=r"router\.batch_priority=True is not allowed: \w+Router with "
                                          r"capacity_factor=None is dropless"):
        check_router(_node(name, batch_priority=True), E, domain="vision")


def test_bpr_keeps_the_most_confident_first_choices():
    """GShard with BPR: at an expert whose first-choice buffer overflowed, every kept first choice has a
    top-1 gate at least as high as every dropped one (V-MoE §3.1)."""
    torch.manual_seed(0)
    router = hydra.utils.instantiate(_node("gshard", batch_priority=True, capacity_factor=0.25))(dim=D, num_experts=E)
    router.eval()
    x_GSD = torch.randn(1, S, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        routing = router(x_GSD)
        gates_SE = torch.softmax(router.linear_logits(x_GSD, router.weight), -1)[0]
    top_S, first_S = gates_SE.max(-1)
    kept = set(zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()))
    checked = 0
    for e in range(E):
        mine = (first_S == e).nonzero().flatten().tolist()
        kept_p = [float(top_S[t]) for t in mine if (t, e) in kept]
        lost_p = [float(top_S[t]) for t in mine if (t, e) not in kept]
        if kept_p and lost_p:
            assert min(kept_p) >= max(lost_p)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", ["topk", "switch", "sinkhorn_token_choice", "sparse_token_choice", "gshard"])
def test_batch_priority_with_a_dropless_capacity_is_refused(name):
    """Routers whose paper default has a capacity refuse BPR too once capacity_factor=null makes them dropless."""
    with pytest.raises(ConfigError, match=r"router\.batch_priority=True is not allowed: \w+Router with "
                                          r"capacity_factor=None is dropless"):
        check_router(_node(name, batch_priority=True, capacity_factor=None), E, domain="vision")
