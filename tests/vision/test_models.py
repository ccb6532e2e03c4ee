"""V-MoE models: registration with timm, placements, the dense baseline, upcycling, every router."""

from __future__ import annotations

import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import core
import vision
from core.moe import MoE
from core.routers.topk import TopKRouter

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_SHAPES = {  # name: (depth, width, mlp width, patch)
    "vmoe_s_patch32_224": (8, 512, 2048, 32),
    "vmoe_b_patch32_224": (12, 768, 3072, 32),
    "vmoe_b_patch16_224": (12, 768, 3072, 16),
}


def test_every_vmoe_name_is_registered_and_builds():
    names = timm.list_models("vmoe_*")
    assert set(PAPER_SHAPES) | {"vmoe_tiny_patch4_28"} <= set(names)
    for name in names:
        if name in PAPER_SHAPES:
            with torch.device("meta"):  # shapes only: B/16 with 32 experts is ~1B parameters
                model = timm.create_model(name)
            depth, width, hidden, patch = PAPER_SHAPES[name]
            assert model.patch_embed.patch_size == (patch, patch)
            assert model.moe_blocks == list(range(1, depth, 2))
            layers = vision.moe_layers(model)
            assert len(layers) == depth // 2
            assert all(m.num_experts == 32 and m.experts.w1_EDF.shape == (32, width, hidden) for m in layers)
        else:
            model = timm.create_model(name)
            x = torch.randn(2, *model.pretrained_cfg["input_size"])
            assert model(x).shape == (2, model.num_classes)


def test_tiny_shapes_and_parameter_count():
    moe = timm.create_model("vmoe_tiny_patch4_28")
    dense = timm.create_model("vmoe_tiny_patch4_28", moe=False)
    assert moe.moe_blocks == [1, 3, 5] and dense.moe_blocks == []
    assert not any(isinstance(m, MoE) for m in dense.modules())
    mlp = sum(p.numel() for p in dense.blocks[1].mlp.parameters())
    router = 8 * 96  # one E×D gate per MoE layer
    n_moe, n_dense = (sum(p.numel() for p in m.parameters()) for m in (moe, dense))
    assert n_moe == n_dense + 3 * (7 * mlp + router)
    assert moe(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("placement,num_last,expected", [
    ("every_other", None, [1, 3, 5]), ("last_n", 2, [3, 5]), ("last_half", None, [3, 4, 5]),
    ("all", None, [0, 1, 2, 3, 4, 5]), ([0, -1], None, [0, 5]),
])
def test_placements(placement, num_last, expected):
    model = timm.create_model("vmoe_tiny_patch4_28", placement=placement, num_last=num_last, num_experts=2)
    assert model.moe_blocks == expected
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)] == expected


def test_router_partial_is_used_in_every_layer():
    router = functools.partial(TopKRouter, top_k=1, capacity_factor=None)
    model = timm.create_model("vmoe_tiny_patch4_28", router=router)
    routers = [m.router for m in vision.moe_layers(model)]
    assert all(isinstance(r, TopKRouter) and r.top_k == 1 for r in routers)
    assert len({id(r) for r in routers}) == 3  # one router per layer, not shared


def test_pretrained_is_refused_with_a_pointer_to_upcycling():
    with pytest.raises(ValueError, match="upcycle_from"):
        timm.create_model("vmoe_tiny_patch4_28", pretrained=True)


def test_upcycled_model_matches_the_dense_model_before_training():
    torch.manual_seed(0)
    dense = timm.create_model("vmoe_tiny_patch4_28", moe=False).eval()
    router = functools.partial(TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0, renormalize=True)
    moe = timm.create_model("vmoe_tiny_patch4_28", router=router, upcycle_from=dense).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref, out = dense(x), moe(x)
    assert not torch.allclose(ref, torch.zeros_like(ref))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # in training mode too (no noise, no drops, no dropout); each token really went to 2 experts
    core.reset_routing_stats(moe)
    with torch.no_grad():
        torch.testing.assert_close(moe.train()(x), ref, atol=1e-5, rtol=0)
    stats = core.routing_stats(moe)
    assert stats["experts_per_token"] == pytest.approx(2.0) and stats["dropped_fraction"] == 0


def test_upcycling_from_a_saved_state_dict(tmp_path):
    dense = timm.create_model("vmoe_tiny_patch4_28", moe=False)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    moe = timm.create_model("vmoe_tiny_patch4_28", upcycle_from=str(tmp_path / "dense.pt"))
    torch.testing.assert_close(moe.blocks[1].mlp.experts.w1_EDF[5], dense.blocks[1].mlp.fc1.weight.t())
    torch.testing.assert_close(moe.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)


def test_a_router_that_needs_token_ids_is_refused():
    class NeedsIds(TopKRouter):
        needs_token_ids = True

    with pytest.raises(ValueError, match="needs token ids"):
        timm.create_model("vmoe_tiny_patch4_28", router=NeedsIds)


def test_every_router_trains_a_tiny_vmoe(router_name, make_router):
    """Each conf/router/*.yaml builds a tiny V-MoE whose loss falls on a fixed batch (or, for
    routers that need token ids or sequences cut into segments, is refused with a clear message)."""
    torch.manual_seed(0)
    kwargs = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_experts=4)
    partial = make_router(router_name)
    probe = partial(dim=32, num_experts=4)
    if probe.needs_token_ids or probe.routes_segments:
        with pytest.raises(ValueError, match="needs token ids|not sequences cut into segments"):
            timm.create_model("vmoe_tiny_patch4_28", router=partial, **kwargs)
        return
    model = timm.create_model("vmoe_tiny_patch4_28", router=partial, **kwargs)
    x = torch.randn(16, 1, 8, 8)
    y = torch.arange(16) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y) + core.collect_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        core.after_optimizer_step(model)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
