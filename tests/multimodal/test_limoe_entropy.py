"""LIMoE's per-modality entropy losses (Mustafa et al., NeurIPS 2022; docs/routers.md §3): they reach the
router weights, point the right way, and the global term spreads a collapsed modality over experts."""

from __future__ import annotations

import functools
import math

import open_clip
import pytest
import torch

import core
from core.routers.topk import TopKRouter
from multimodal import models as M

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["dog", "red apple", "a photo of a sneaker", "crystal ball", "umbrella",
            "house building", "a grayscale photo of an ankle boot", "llama"]
# deterministic top-1 router (no noise), dropless: routing is a pure function of the router weights
TOP1 = functools.partial(TopKRouter, top_k=1, capacity_factor=None, noise_std=0.0,
                         importance_loss_weight=0.0, load_loss_weight=0.0)
MICRO = dict(embed_dim=32, image_size=16, patch_size=4, context_length=16, width=32, layers=2, heads=2,
             num_experts=4, router=TOP1, moe_layers="all")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    text = open_clip.SimpleTokenizer(context_length=16)(CAPTIONS)
    return {"image": torch.randn(len(CAPTIONS), 3, 16, 16, generator=g), "text": text}


def _entropy_terms(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in core.aux_loss_terms(model).items() if "entropy" in k}


def _text_probs(model, batch) -> list[torch.Tensor]:
    """Router probabilities of the valid text tokens, one N×E tensor per MoE layer (last forward)."""
    n_img = batch["image"].shape[0] * model.image_positional_embedding.shape[0]
    valid = (batch["text"] != model.pad_id).reshape(-1)
    out = []
    for _, layer in model.moe_layers():
        scores = layer.last_routing.scores_GSE.reshape(-1, model.num_experts)
        out.append(scores[n_img:n_img + valid.numel()][valid])
    return out


def _global_entropy(probs_NE: torch.Tensor) -> float:
    mean_E = probs_NE.detach().mean(0)
    return float(-(mean_E * mean_E.clamp_min(1e-20).log()).sum())


def _collapse_text_routing(model) -> None:
    """Every router sends every token to expert 0: ln_2's bias becomes a shared direction v (its
    gain shrinks) and row 0 of each router points along v."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.transformer.resblocks:
            v = torch.randn(block.ln_2.bias.shape, generator=g)
            v = 2.0 * v / v.norm()
            block.ln_2.bias.copy_(v)
            block.ln_2.weight.fill_(0.1)
            w = block.mlp.router.weight
            w.zero_()
            w[0] = 3.0 * v


@pytest.mark.parametrize("kind", ["local", "global"])
def test_entropy_losses_reach_every_router(batch, kind):
    torch.manual_seed(0)
    on = (1.0, 1.0)
    model = M.LIMoE(**MICRO, local_entropy_weight=on if kind == "local" else (0, 0),
                    global_entropy_weight=on if kind == "global" else (0, 0)).train()
    model(batch["image"], batch["text"])
    terms = _entropy_terms(model)
    assert set(terms) == {f"{kind}_entropy_image", f"{kind}_entropy_text"}
    if kind == "global":  # at a random init the text marginal is below log E: the hinge is active
        assert terms["global_entropy_text"] > 0
    sum(terms.values()).backward()
    for _, layer in model.moe_layers():
        g = layer.router.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_entropy_loss_gradients_point_the_right_way(batch):
    """One small step against each loss's gradient moves its entropy the way LIMoE wants: the local
    term lowers the mean per-token entropy, the global term raises the text marginal's entropy."""
    for kind in ("local", "global"):
        torch.manual_seed(0)
        model = M.LIMoE(**MICRO, local_entropy_weight=(0, 1.0) if kind == "local" else (0, 0),
                        global_entropy_weight=(0, 1.0) if kind == "global" else (0, 0),
                        global_min_experts=(None, None)).train()
        routers = [layer.router.weight for _, layer in model.moe_layers()]

        @torch.no_grad()
        def measure():
            model(batch["image"], batch["text"])
            probs = _text_probs(model, batch)
            local = sum(float(-(p * p.clamp_min(1e-20).log()).sum(-1).mean()) for p in probs)
            return local, sum(_global_entropy(p) for p in probs)

        local0, global0 = measure()
        model(batch["image"], batch["text"])
        sum(_entropy_terms(model).values()).backward()
        with torch.no_grad():
            for w in routers:
                w -= 0.05 * w.grad
        local1, global1 = measure()
        if kind == "local":
            assert local1 < local0
        else:
            assert global1 > global0


def test_global_entropy_loss_spreads_collapsed_text_routing(batch):
    """Collapsed init (every token's first choice is expert 0): a few optimizer steps on the global
    entropy loss raise the text tokens' routing entropy and lower the share of the top expert; with
    the loss off the same steps change nothing (no gradient reaches the routers)."""
    results = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = M.LIMoE(**MICRO, global_entropy_weight=(0.0, weight), global_min_experts=(None, None)).train()
        _collapse_text_routing(model)
        routers = [layer.router.weight for _, layer in model.moe_layers()]
        opt = torch.optim.Adam(routers, lr=0.1)
        model(batch["image"], batch["text"])
        before = [_global_entropy(p) for p in _text_probs(model, batch)]
        assert max(before) < 0.1  # collapsed: the text marginal sits on one expert
        for _ in range(8):
            opt.zero_grad()
            model(batch["image"], batch["text"])
            aux = core.collect_aux_loss(model)
            if aux.requires_grad:
                aux.backward()
                opt.step()
        model.eval()
        M.reset_modality_usage(model)
        with torch.no_grad():
            model(batch["image"], batch["text"])
        after = [_global_entropy(p) for p in _text_probs(model, batch)]
        usage = M.modality_usage(model)
        results[weight] = (before, after, usage["text_top_choice_share"])
    before, after_off, share_off = results[0.0]
    _, after_on, share_on = results[1.0]
    assert after_off == pytest.approx(before, abs=1e-6) and share_off == 1.0
    assert all(a > b + 0.5 for a, b in zip(after_on, before)), (before, after_on)
    assert all(a <= math.log(4) + 1e-6 for a in after_on)
    assert share_on < 0.9


def test_top_choice_share_counts_first_choices_before_capacity(batch):
    """The collapse measure counts each valid text token's highest-scoring expert even when a full
    expert drops it; padding never counts."""
    torch.manual_seed(0)
    tight = functools.partial(TopKRouter, top_k=1, capacity_factor=0.25, noise_std=0.0)
    model = M.LIMoE(**{**MICRO, "router": tight}).eval()
    _collapse_text_routing(model)
    with torch.no_grad():
        model(batch["image"], batch["text"])
    n_txt = (batch["text"] != 0).sum().item()
    for counts_ME, choices_ME in zip(model.modality_tokens_LME, model.modality_choices_LME):
        assert choices_ME[1].sum().item() == n_txt and choices_ME[1, 0].item() == n_txt
        assert counts_ME[1].sum().item() < n_txt  # expert 0 is full: most text tokens were dropped
    usage = M.modality_usage(model)
    assert usage["text_top_choice_share"] == 1.0 and usage["image_top_choice_share"] == 1.0
