"""V-MoE image classifiers: timm ``VisionTransformer``s whose MLPs in chosen blocks are core MoE layers.

Riquelme et al., "Scaling Vision with Sparse Mixture of Experts" (NeurIPS 2021): a ViT whose MLP in
every other block (or the last n of those) is a mixture of E experts of the MLP's shape, routed by
noisy softmax top-K (K=2). Puigcerver et al. (ICLR 2024) put Soft MoE in the last half of the blocks;
any ``placement`` of ``core.surgery`` works. Sparse upcycling (Komatsuzaki et al., ICLR 2023) starts
every expert from a dense ViT's MLP (``upcycle_from=``).

Registered with timm on ``import vision``::

    import timm, vision
    model = timm.create_model("vmoe_tiny_patch4_28", num_classes=10)             # V-MoE top-2
    model = timm.create_model("vmoe_tiny_patch4_28", router="expert_choice")     # conf/router/expert_choice.yaml
    model = timm.create_model("vmoe_tiny_patch4_28", router="topk", router_kwargs={"top_k": 1})
    model = timm.create_model("vmoe_tiny_patch4_28", router=partial(ExpertChoiceRouter))
    dense = timm.create_model("vmoe_tiny_patch4_28", moe=False)                   # the ViT baseline

A router name is resolved as ``+router=<name>`` is in a run (``core.router_config``): Hydra composes
``conf/router/<name>.yaml``, ``router_kwargs`` override its values, and ``router_search_path`` adds
folders holding further ``router/*.yaml`` (as ``hydra.searchpath`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from core.moe import MoE
from core.router_config import RouterSpec, router_factory
from core.routers.base import check_applicable
from core.surgery import load_dense_state_dict, replace_mlps_with_moe

__all__ = ["create_vmoe", "moe_layers", "vmoe_tiny_patch4_28", "vmoe_s_patch32_224", "vmoe_b_patch32_224",
           "vmoe_b_patch16_224"]


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs}


# No released weights: the tags only describe inputs (timm's registry wants a config per name).
default_cfgs = generate_default_cfgs({
    "vmoe_tiny_patch4_28.untrained": _cfg(num_classes=10, input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,),
                                          crop_pct=1.0),
    "vmoe_s_patch32_224.untrained": _cfg(),
    "vmoe_b_patch32_224.untrained": _cfg(),
    "vmoe_b_patch16_224.untrained": _cfg(),
})


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE layers in block order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def _init_experts_like_vit(model: nn.Module) -> None:
    """Experts start like timm's ViT MLPs (truncated normal, std 0.02; zero biases), each drawn on
    its own; the MoE layer's default (nn.Linear-style uniform) is much larger than the rest of a ViT."""
    for layer in moe_layers(model):
        for name, p in layer.experts.named_parameters():
            if name.startswith("w"):
                nn.init.trunc_normal_(p, std=0.02)
            else:
                nn.init.zeros_(p)


def create_vmoe(
    variant: str,
    pretrained: bool = False,
    *,
    moe: bool = True,
    num_experts: int = 32,
    router: RouterSpec = None,
    router_kwargs: Mapping[str, Any] | None = None,
    router_search_path: Sequence[str | Path] = (),
    placement: str | Sequence[int] = "every_other",
    num_last: int | None = None,
    group_size: int | None = None,
    num_shared_experts: int = 0,
    expert_impl: str = "auto",
    upcycle_from: str | Path | Mapping[str, torch.Tensor] | nn.Module | None = None,
    **kwargs,
) -> VisionTransformer:
    """A timm ``VisionTransformer`` with MoE MLPs in the chosen blocks.

    Args:
        variant: model name (for timm's config registry).
        pretrained: not available (no released V-MoE weights in timm); use ``upcycle_from``.
        moe: False builds the same ViT with dense MLPs (the baseline).
        num_experts: E per MoE layer.
        router: a router config name (``"expert_choice"``: ``conf/router/expert_choice.yaml``), a router
            partial ``router(dim=D, num_experts=E)`` (a Hydra ``_partial_`` config) or a shared
            ``Router``; None: V-MoE softmax top-2 (cf 1.05, noise 1/E, importance + load losses).
        router_kwargs: arguments over the named config's values (or the partial's).
        router_search_path: further config folders holding ``router/<name>.yaml`` (``hydra.searchpath``).
        placement: ``every_other`` (V-MoE), ``last_n``, ``last_half`` (Soft MoE), ``all`` or a list.
        num_last: n for ``last_n``.
        group_size: tokens per routing group (None: one image per group).
        num_shared_experts: always-on experts per MoE layer.
        expert_impl: ``auto`` | ``chunked`` | ``grouped`` | ``loop`` (core.experts).
        upcycle_from: dense ViT weights (a module, a state dict, or a file holding one) copied into the
            model, every expert of an MoE block starting as that block's dense MLP.
        **kwargs: ``VisionTransformer`` arguments (img_size, patch_size, embed_dim, depth, ...).
    """
    if pretrained:
        raise ValueError(f"pretrained=True is not available for {variant}: no released weights; "
                         "start from a dense ViT with upcycle_from=<state dict or model>.")
    for key in ("pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    router = router_factory(router, router_kwargs, search_path=router_search_path) if moe else None
    model = build_model_with_cfg(VisionTransformer, variant, pretrained=False, **kwargs)
    model.moe_blocks = []
    if moe:
        model.moe_blocks = replace_mlps_with_moe(
            model.blocks, placement, num_experts=num_experts, router=router, num_last=num_last,
            group_size=group_size, num_shared_experts=num_shared_experts, expert_impl=expert_impl)
        for layer in moe_layers(model):
            check_applicable(layer.router, token_ids=False, where="image patches")
        _init_experts_like_vit(model)
    if upcycle_from is not None:
        if isinstance(upcycle_from, (str, Path)):
            upcycle_from = torch.load(upcycle_from, map_location="cpu", weights_only=True)
            if isinstance(upcycle_from, Mapping) and "model" in upcycle_from and isinstance(upcycle_from["model"], Mapping):
                upcycle_from = upcycle_from["model"]
        load_dense_state_dict(model, upcycle_from)
    return model


@register_model
def vmoe_tiny_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """V-MoE for 28×28 grayscale images (Fashion-MNIST): patch 4 (49 tokens), width 96, depth 6,
    3 heads, E=8 experts in blocks 1, 3, 5, top-2; global average pooling, which trains faster
    than a class token at this size. ~2.2M parameters, ~0.9M active."""
    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                mlp_ratio=4.0, global_pool="avg", class_token=False, num_experts=8)
    return create_vmoe("vmoe_tiny_patch4_28", pretrained, **dict(args, **kwargs))


@register_model
def vmoe_s_patch32_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """V-MoE-S/32 (Riquelme et al. 2021): 8 blocks, width 512, MLP 2048, 8 heads, E=32 every other block."""
    args = dict(patch_size=32, embed_dim=512, depth=8, num_heads=8, mlp_ratio=4.0, num_experts=32)
    return create_vmoe("vmoe_s_patch32_224", pretrained, **dict(args, **kwargs))


@register_model
def vmoe_b_patch32_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """V-MoE-B/32: 12 blocks, width 768, MLP 3072, 12 heads, E=32 every other block."""
    args = dict(patch_size=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, num_experts=32)
    return create_vmoe("vmoe_b_patch32_224", pretrained, **dict(args, **kwargs))


@register_model
def vmoe_b_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """V-MoE-B/16: 12 blocks, width 768, MLP 3072, 12 heads, E=32 every other block (the paper's
    B/16 also appears with ``placement='last_n', num_last=2``)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, num_experts=32)
    return create_vmoe("vmoe_b_patch16_224", pretrained, **dict(args, **kwargs))
