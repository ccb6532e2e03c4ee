"""``timm.create_model`` takes a router by config name: ``router="expert_choice"`` builds the router of
``conf/router/expert_choice.yaml``, ``router_kwargs`` override its values, ``router_search_path``
finds routers added in further config folders, and a wrong name or key is a ValueError naming what
is allowed (``core.router_config``)."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import vision  # noqa: F401  (registers vmoe_* with timm)
from core.router_config import router_factory, router_names
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.switch import SwitchRouter
from core.routers.topk import TopKRouter
from tests.conftest import make_router_partial, router_names as conf_router_names
from vision.models import moe_layers

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "vmoe_tiny_patch4_28"  # MoE in blocks 1, 3, 5


def test_router_name_builds_that_router_in_every_moe_layer():
    model = timm.create_model(NAME, router="expert_choice")
    layers = moe_layers(model)
    assert len(layers) == 3
    assert all(type(layer.router) is ExpertChoiceRouter for layer in layers)
    assert all(layer.router.capacity_factor == 2.0 for layer in layers)  # conf/router/expert_choice.yaml
    assert len({id(layer.router) for layer in layers}) == 3  # one router per layer, as from a partial
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_router_kwargs_override_the_config_values():
    model = timm.create_model(NAME, router="mixtral", router_kwargs={"top_k": 1, "switch_loss_weight": 0.05})
    for layer in moe_layers(model):
        router = layer.router
        assert type(router) is TopKRouter
        assert (router.top_k, router.loss_weights["switch"]) == (1, 0.05)  # given
        assert router.renormalize is True and router.capacity_factor is None  # kept from mixtral.yaml


def test_a_name_builds_the_same_model_as_the_hydra_partial():
    torch.manual_seed(0)
    by_name = timm.create_model(NAME, router="topk")
    torch.manual_seed(0)
    by_partial = timm.create_model(NAME, router=make_router_partial("topk"))
    a, b = by_name.state_dict(), by_partial.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_partials_and_routers_keep_working():
    model = timm.create_model(NAME, router=functools.partial(ExpertChoiceRouter, capacity_factor=1.0))
    assert all(layer.router.capacity_factor == 1.0 for layer in moe_layers(model))
    model = timm.create_model(NAME, router=ExpertChoiceRouter, router_kwargs={"capacity_factor": 3.0})
    assert all(layer.router.capacity_factor == 3.0 for layer in moe_layers(model))
    shared = TopKRouter(96, 8)
    model = timm.create_model(NAME, router=shared)
    assert all(layer.router is shared for layer in moe_layers(model))


def test_unknown_name_lists_the_known_routers():
    with pytest.raises(ValueError, match=r"router='expert_choise' is not allowed") as err:
        timm.create_model(NAME, router="expert_choise")
    for name in conf_router_names():  # every conf/router file is offered
        assert f"'{name}'" in str(err.value)


def test_unknown_router_kwarg_lists_the_parameters():
    with pytest.raises(ValueError, match=r"ExpertChoiceRouter .* no parameter 'top_k'.*capacity_factor"):
        timm.create_model(NAME, router="expert_choice", router_kwargs={"top_k": 2})
    with pytest.raises(ValueError, match="not allowed without a router"):
        router_factory(None, {"top_k": 1})
    with pytest.raises(ValueError, match="built TopKRouter"):
        router_factory(TopKRouter(8, 4), {"top_k": 1})


def test_a_router_in_a_further_config_folder_is_found(tmp_path):
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "wide_switch.yaml").write_text(
        "_target_: core.routers.switch.SwitchRouter\n_partial_: true\ncapacity_factor: 3.0\n")
    assert "wide_switch" not in router_names()
    with pytest.raises(ValueError, match="wide_switch"):
        timm.create_model(NAME, router="wide_switch")
    assert "wide_switch" in router_names([tmp_path]) and "topk" in router_names([tmp_path])
    model = timm.create_model(NAME, router="wide_switch", router_search_path=[tmp_path],
                              router_kwargs={"switch_loss_weight": 0.1})
    routers = [layer.router for layer in moe_layers(model)]
    assert all(type(r) is SwitchRouter and r.capacity_factor == 3.0 and r.loss_weights["switch"] == 0.1 for r in routers)


def test_resolving_inside_a_running_hydra_app_leaves_it_alone(tmp_path):
    (tmp_path / "app.yaml").write_text("x: 1\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        factory = router_factory("switch")
        assert type(factory(dim=8, num_experts=4)) is SwitchRouter
        assert compose(config_name="app").x == 1  # the application's own config is still the one composed
    assert not GlobalHydra.instance().is_initialized()
