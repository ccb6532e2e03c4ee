"""Routers by config name in every domain's model constructor (``core.router_config``): the recsys
gates and the nlp language model take ``conf/router`` names as the vision and multimodal factories do."""

from __future__ import annotations

import pytest
import torch

from core.router_config import router_config, router_factory
from core.router_table import build_router
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.switch import SwitchRouter
from core.routers.topk import TopKRouter
from nlp.models import MoETransformerLM
from recsys.models import MMoE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recsys_gates_by_name():
    model = MMoE(None, 8, 2, num_experts=4, gate="expert_choice", routing_group_size=16)
    gates = list(model.body.mixture.gates)
    assert len(gates) == 2 and all(type(g) is ExpertChoiceRouter for g in gates)
    assert model(torch.randn(16, 8)).shape == (16, 2)
    with pytest.raises(ValueError, match="router='expert_choise' is not allowed"):
        MMoE(None, 8, 2, num_experts=4, gate="expert_choise")


def test_nlp_router_by_name():
    model = MoETransformerLM(vocab_size=64, dim=32, depth=2, num_heads=2, max_seq_len=16,
                             router="switch", num_experts=4)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert routers and all(type(r) is SwitchRouter and r.capacity_factor == 1.25 for r in routers)  # switch.yaml
    assert model(torch.randint(0, 64, (2, 16))).shape == (2, 16, 64)


def test_aliases_compose_through_their_defaults_list():
    node = router_config("softmax_token_choice")  # an alias: a defaults list naming topk
    assert node._target_ == "core.routers.topk.TopKRouter"
    assert type(build_router("softmax_token_choice", dim=8, num_experts=4)) is TopKRouter
    assert type(router_factory("softmax_token_choice")(dim=8, num_experts=4)) is TopKRouter
