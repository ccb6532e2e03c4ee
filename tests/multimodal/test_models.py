"""CLIP-MoE and LIMoE: open_clip shapes kept, sparse upcycling exact, padding out of routing,
every router of ``conf/router/`` trains a tiny CLIP-MoE (or refuses with a ValueError)."""

from __future__ import annotations

import functools

import open_clip
import pytest
import torch

import core
from core.moe import MoE
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.topk import TopKRouter
from multimodal import models as M
from multimodal.training import clip_loss

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = "mm-clip-micro-p4-16"  # 16x16 images, patch 4, two 2x32 towers, context 16, embed 32
CAPTIONS = ["dog", "red apple", "a photo of a sneaker", "crystal ball", "umbrella",
            "house building", "a grayscale photo of an ankle boot", "llama"]
DROPLESS_TOPK = functools.partial(TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0, renormalize=True)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    text = open_clip.SimpleTokenizer(context_length=16)(CAPTIONS)
    return {"image": torch.randn(len(CAPTIONS), 3, 16, 16, generator=g), "text": text}


def _moe_layers(model, prefix):
    return [m for n, m in model.named_modules() if isinstance(m, MoE) and n.startswith(prefix)]


def test_tower_mlps_replaced_in_place():
    model = M.create_clip_moe(MICRO, num_experts=4, router=DROPLESS_TOPK, vision_layers="every_other",
                              text_layers="all")
    assert isinstance(model, open_clip.CLIP)
    assert isinstance(model.visual.transformer.resblocks[1].mlp, MoE)
    assert not isinstance(model.visual.transformer.resblocks[0].mlp, MoE)
    assert all(isinstance(b.mlp, MoE) for b in model.transformer.resblocks)
    # open_clip reads its cast dtype from resblocks[0]; it must survive the conversion
    assert model.transformer.get_cast_dtype() == torch.float32


def test_encode_keeps_open_clip_shapes(batch):
    dense = M.create_clip(MICRO).eval()
    moe = M.create_clip_moe(MICRO, num_experts=4, router=DROPLESS_TOPK, vision_layers="all", text_layers="all").eval()
    limoe = M.LIMoE(embed_dim=32, image_size=16, patch_size=4, context_length=16, width=32, layers=2, heads=2,
                    num_experts=4).eval()
    B = len(CAPTIONS)
    with torch.no_grad():
        for model in (moe, limoe):
            assert model.encode_image(batch["image"]).shape == dense.encode_image(batch["image"]).shape == (B, 32)
            assert model.encode_text(batch["text"]).shape == dense.encode_text(batch["text"]).shape == (B, 32)
            img, txt, scale = model(batch["image"], batch["text"])
            assert img.shape == txt.shape == (B, 32) and scale.ndim == 0
            assert torch.allclose(img.norm(dim=-1), torch.ones(B), atol=1e-5)
            assert torch.allclose(model.encode_text(batch["text"], normalize=True).norm(dim=-1), torch.ones(B), atol=1e-5)


def test_upcycled_clip_moe_encodes_exactly_as_dense_parent(batch):
    torch.manual_seed(1)
    dense = M.create_clip(MICRO).eval()
    moe = M.upcycle_clip(dense, num_experts=4, router=DROPLESS_TOPK, vision_layers="all", text_layers="all").eval()
    assert len(_moe_layers(moe, "")) == 4
    assert not any(isinstance(m, MoE) for m in dense.modules())  # the parent is left dense
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            arg = batch["image"] if encode == "encode_image" else batch["text"]
            ref, out = getattr(dense, encode)(arg), getattr(moe, encode)(arg)
            assert torch.allclose(ref, out, atol=1e-5, rtol=1e-5), (encode, (ref - out).abs().max())
        moe.train()  # no noise, no capacity: training-mode routing is the same function
        assert torch.allclose(moe.encode_text(batch["text"]), dense.encode_text(batch["text"]), atol=1e-5)


def test_upcycling_from_a_dense_checkpoint(tmp_path, batch):
    torch.manual_seed(2)
    dense = M.create_clip(MICRO).eval()
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    moe = M.create_clip_moe(MICRO, num_experts=2, router=DROPLESS_TOPK, vision_layers="all", text_layers="all",
                            dense_checkpoint=str(tmp_path / "dense.pt")).eval()
    with torch.no_grad():
        assert torch.allclose(moe.encode_image(batch["image"]), dense.encode_image(batch["image"]), atol=1e-5)
        assert torch.allclose(moe.encode_text(batch["text"]), dense.encode_text(batch["text"]), atol=1e-5)


def test_text_padding_never_counts_in_routing(batch, make_router, router_name):
    """Every router: the text tower's statistics count exactly the non-padding tokens, and no
    assignment of a sparse routing points at a padding position."""
    try:
        model = M.create_clip_moe(MICRO, num_experts=4, router=make_router(router_name), vision_layers="none",
                                  text_layers="all")
    except ValueError as err:  # routers that cannot serve CLIP (hash: needs token ids) say so
        assert "token ids" in str(err)
        return
    for layer in _moe_layers(model, "transformer."):
        layer.keep_last_routing = True
    text = batch["text"]
    valid = text != 0
    assert (~valid).any()  # the batch has padding to keep out
    model.train()
    try:
        model.encode_text(text)
    except ValueError as err:  # a router that cannot route this group shape says why
        assert str(err)
        return
    for layer in _moe_layers(model, "transformer."):
        n_valid = layer.stat_counters[2].item()
        assert n_valid == valid.sum().item()
        r = layer.last_routing
        assert r.mask_GS is not None and torch.equal(r.mask_GS.reshape(valid.shape), valid)
        if not (r.is_soft or r.is_merged):
            assert valid.reshape(-1)[r.token_idx_N].all()


def test_dropless_counts_equal_k_times_real_tokens(batch):
    model = M.create_clip_moe(MICRO, num_experts=4, router=DROPLESS_TOPK, vision_layers="none", text_layers="all")
    model.encode_text(batch["text"])
    n_real = (batch["text"] != 0).sum().item()
    for layer in _moe_layers(model, "transformer."):
        assert layer.stat_tokens_E.sum().item() == 2 * n_real
    usage = M.modality_usage(model)
    assert set(usage["text"]) == {"transformer.resblocks.0.mlp", "transformer.resblocks.1.mlp"}
    assert usage["image"] == {} and 0.25 <= usage["text_top_expert_share"] <= 1.0


def test_expert_choice_never_picks_padding(batch):
    # capacity larger than the real tokens of a caption: without the mask padding would be picked
    router = functools.partial(ExpertChoiceRouter, capacity_factor=4.0, noise_std=0.0)
    model = M.create_clip_moe(MICRO, num_experts=4, router=router, vision_layers="none", text_layers=[0])
    layer = _moe_layers(model, "transformer.")[0]
    layer.keep_last_routing = True
    model.eval()
    model.encode_text(batch["text"])
    valid = (batch["text"] != 0).reshape(-1)
    assert valid[layer.last_routing.token_idx_N].all()
    assert layer.last_routing.token_idx_N.numel() == 4 * valid.sum().item()  # every expert takes all real tokens


def test_hash_router_refused_with_value_error():
    from core.routers.hash import HashRouter
    with pytest.raises(ValueError, match="token ids"):
        M.create_clip_moe(MICRO, num_experts=4, router=HashRouter, text_layers="all")


def test_every_router_trains_a_tiny_clip_moe(batch, make_router, router_name):
    torch.manual_seed(0)
    try:
        model = M.create_clip_moe(MICRO, num_experts=4, router=make_router(router_name), vision_layers=[1],
                                  text_layers=[1])
    except ValueError as err:
        assert "token ids" in str(err)
        return
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(5):
        try:
            loss, _ = clip_loss(model, batch)
        except ValueError as err:  # e.g. BASE layers need groups divisible by E: a clear refusal
            assert step == 0 and str(err)
            return
        losses.append(loss.item())
        (loss + core.collect_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        core.after_optimizer_step(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-2:]) < losses[0], losses


def test_limoe_routes_both_modalities_in_one_group(batch):
    torch.manual_seed(0)
    model = M.LIMoE(embed_dim=32, image_size=16, patch_size=4, context_length=16, width=32, layers=2, heads=2,
                    num_experts=4, router=DROPLESS_TOPK, moe_layers="all",
                    local_entropy_weight=(0.1, 0.1), global_entropy_weight=(0.1, 0.1), global_min_experts=(None, 2))
    model.train()
    model(batch["image"], batch["text"])
    B = len(CAPTIONS)
    n_img, n_txt = B * 17, (batch["text"] != 0).sum().item()
    for (_, layer), counts_ME in zip(model.moe_layers(), model.modality_tokens_LME):
        r = layer.last_routing
        assert r.num_groups == 1 and r.group_size == n_img + B * 16  # one group: all image and text tokens
        assert counts_ME[0].sum().item() == 2 * n_img and counts_ME[1].sum().item() == 2 * n_txt
    terms = core.aux_loss_terms(model)
    for name in ("local_entropy_image", "local_entropy_text", "global_entropy_image", "global_entropy_text"):
        assert name in terms and torch.isfinite(terms[name])
    assert terms["local_entropy_image"] > 0
    usage = M.modality_usage(model)
    assert set(usage) >= {"image", "text", "text_top_expert_share"}
    for fractions in usage["text"].values():
        assert abs(sum(fractions) - 1) < 1e-6


def test_limoe_entropy_losses_off_add_nothing(batch):
    model = M.LIMoE(embed_dim=32, image_size=16, patch_size=4, context_length=16, width=32, layers=2, heads=2,
                    num_experts=4, router=DROPLESS_TOPK)
    model(batch["image"], batch["text"])
    assert not any("entropy" in k for k in core.aux_loss_terms(model))


def test_limoe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="global_min_experts"):
        M.LIMoE(num_experts=4, global_min_experts=(None, 9))
    with pytest.raises(ValueError, match="patch_size"):
        M.LIMoE(image_size=30, patch_size=4)


def test_limoe_takes_every_router(batch, make_router, router_name):
    """One LIMoE training step per router: finite loss and gradients, entropy terms on the routers;
    routers that cannot serve (hash: no token ids for image patches; Lory: no sequences of segments) refuse
    with a ValueError."""
    torch.manual_seed(0)
    try:
        model = M.LIMoE(embed_dim=32, image_size=16, patch_size=4, context_length=16, width=32, layers=2, heads=2,
                        num_experts=4, router=make_router(router_name), local_entropy_weight=(0.1, 0.1),
                        global_entropy_weight=(0.1, 0.1), global_min_experts=(None, 2))
    except ValueError as err:
        assert "token ids" in str(err) or "not sequences cut into segments" in str(err)
        return
    try:
        loss, logs = clip_loss(model, batch)
    except ValueError as err:  # e.g. BASE layers: the joint group is not divisible by E
        assert str(err)
        return
    terms = core.aux_loss_terms(model)
    assert "local_entropy_text" in terms and "global_entropy_image" in terms
    (loss + core.collect_aux_loss(model)).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the batch's routing by modality (logged, then the counters restart)
    assert 0.25 <= logs["text_top_expert_share"] <= 1.0 and 0.25 <= logs["image_top_expert_share"] <= 1.0
