"""core.surgery: MoE placement in timm and open_clip block lists, and sparse upcycling."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from core.moe import MoE
from core.routers.topk import TopKRouter
from core.surgery import (
    build_moe_like, dense_mlp_parts, load_dense_state_dict, moe_block_indices, replace_mlps_with_moe,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# dropless, noiseless, renormalised top-2: with identical experts the MoE equals the dense MLP
EXACT = functools.partial(TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0, renormalize=True)


@pytest.mark.parametrize("depth,placement,num_last,expected", [
    (12, "every_other", None, [1, 3, 5, 7, 9, 11]),
    (8, "last_n", 2, [5, 7]),                       # V-MoE Last-2 of an 8-block S/32
    (12, "last_half", None, [6, 7, 8, 9, 10, 11]),  # Soft MoE
    (3, "all", None, [0, 1, 2]),
    (6, [4, 0, -1], None, [0, 4, 5]),
])
def test_block_indices(depth, placement, num_last, expected):
    assert moe_block_indices(depth, placement, num_last) == expected


@pytest.mark.parametrize("placement,num_last,match", [
    ("sometimes", None, "placement='sometimes'"),
    ("last_n", None, "num_last=None"),
    ("last_n", 4, "num_last=4"),
    ([1, 6], None, "block index 6"),
    ([1, 1], None, "appears twice"),
])
def test_bad_placements_name_the_problem(placement, num_last, match):
    with pytest.raises(ValueError, match=match):
        moe_block_indices(6, placement, num_last)


def _vit():
    import timm
    return timm.models.VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32,
                                         depth=4, num_heads=2, drop_path_rate=0.0)


def test_replace_in_a_timm_vit_keeps_widths_and_activation():
    vit = _vit()
    idx = replace_mlps_with_moe(vit.blocks, "every_other", num_experts=4)
    assert idx == [1, 3]
    for i, block in enumerate(vit.blocks):
        assert isinstance(block.mlp, MoE) == (i in idx)
    moe = vit.blocks[1].mlp
    assert (moe.experts.in_features, moe.experts.hidden_features, moe.experts.out_features) == (32, 128, 32)
    assert isinstance(moe.experts.act, nn.GELU)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_upcycled_timm_vit_equals_the_dense_one():
    torch.manual_seed(0)
    vit = _vit().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
        replace_mlps_with_moe(vit.blocks, "all", num_experts=4, router=EXACT, upcycle=True)
        torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=0)


def test_upcycled_open_clip_transformer_equals_the_dense_one():
    from open_clip.transformer import Transformer

    torch.manual_seed(0)
    tr = Transformer(width=32, layers=3, heads=2).eval()
    fc1, act, fc2 = dense_mlp_parts(tr.resblocks[0].mlp)
    assert (fc1.in_features, fc2.out_features) == (32, 32)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = tr(x)
        idx = replace_mlps_with_moe(tr.resblocks, "last_n", num_last=1, num_experts=3, router=EXACT, upcycle=True)
        assert idx == [1]
        torch.testing.assert_close(tr(x), ref, atol=1e-5, rtol=0)


def test_load_dense_state_dict_upcycles_and_reports_fresh_parameters():
    torch.manual_seed(0)
    dense = _vit().eval()
    moe = _vit()
    replace_mlps_with_moe(moe.blocks, "every_other", num_experts=4, router=EXACT)
    fresh = load_dense_state_dict(moe, dense.state_dict())
    assert fresh and all(".router." in k for k in fresh)  # only the gates keep their initialisation
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(x), dense(x), atol=1e-5, rtol=0)


def test_load_dense_state_dict_rejects_another_architecture():
    moe = _vit()
    replace_mlps_with_moe(moe.blocks, "every_other", num_experts=2)
    other = nn.Linear(3, 3).state_dict()
    with pytest.raises(ValueError, match="no place in the model"):
        load_dense_state_dict(moe, other)


def test_an_unknown_mlp_is_refused():
    with pytest.raises(ValueError, match="cannot read a dense FFN"):
        build_moe_like(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), num_experts=2)


def test_meta_device_builds_without_memory():
    with torch.device("meta"):
        vit = _vit()
        replace_mlps_with_moe(vit.blocks, "all", num_experts=64)
    assert vit.blocks[0].mlp.experts.w1_EDF.is_meta and vit.blocks[0].mlp.router.weight.is_meta
