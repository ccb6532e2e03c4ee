"""Vision's training pieces: the config checks, the timm model, cross-entropy and top-1 accuracy
(used by ``vision.train.VisionTask``)."""

from __future__ import annotations

import re

import hydra
import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import vision  # noqa: F401  (registers vmoe_* with timm)
from core.checks import ConfigError, check_int, check_readable_dir
from core.experts import IMPLS
from core.surgery import PLACEMENTS
from core.validate import check_router
from vision.data import AUGMENTATIONS, DATASETS

__all__ = ["build_model", "classification_loss", "evaluate_classifier", "validate_config"]

# image side of the datasets that are not resized (imagefolder's is data.img_size)
NATIVE_IMG_SIZE = {"digits": 8, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}


def validate_config(cfg: DictConfig) -> int | None:
    """Check the config before any data is read or model built (``ConfigError`` naming the key, its
    value and what is allowed); returns the experts of a MoE layer (None for the dense ViT)."""
    names = timm.list_models("vmoe_*")
    m, d = cfg.model, cfg.data
    if m.name not in names:
        raise ConfigError("model.name", m.name, f"use one of {names}")
    if not isinstance(m.moe, bool):
        raise ConfigError("model.moe", m.moe, "true or false")
    check_int("model.num_experts", m.num_experts, optional=True)
    placement = m.placement
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            raise ConfigError("model.placement", placement, f"use one of {list(PLACEMENTS)} or a list of block indices")
    elif not OmegaConf.is_list(placement):
        raise ConfigError("model.placement", placement, f"use one of {list(PLACEMENTS)} or a list of block indices")
    check_int("model.group_size", m.group_size, optional=True)
    if m.expert_impl not in IMPLS:
        raise ConfigError("model.expert_impl", m.expert_impl, f"use one of {', '.join(IMPLS)}")
    router = m.router
    if router is not None and (not OmegaConf.is_dict(router) or "_target_" not in router):
        raise ConfigError("router", router, "a conf/router/<name>.yaml choice, e.g. +router=topk")
    if d.name not in DATASETS:
        raise ConfigError("data.name", d.name, f"use one of {list(DATASETS)}")
    if d.augment not in AUGMENTATIONS:
        raise ConfigError("data.augment", d.augment, f"use one of {list(AUGMENTATIONS)}")
    if isinstance(d.batch_size, bool) or not isinstance(d.batch_size, int) or d.batch_size < 1:
        raise ConfigError("data.batch_size", d.batch_size, "it must be a positive integer")
    for key in ("eval_batch_size", "limit_train", "limit_eval"):
        check_int(f"data.{key}", d.get(key), optional=True)
    if d.name == "imagefolder":
        check_readable_dir("data.root", d.root, ": the image folder with train/ and val/ class subfolders")
    _check_patches(cfg)
    num_experts = m.num_experts if m.num_experts is not None else 8
    if not m.moe:
        return None
    check_router(router, num_experts, key="router", domain="vision", group_size=m.group_size,
                 group_key="model.group_size", expert_parallel=cfg.trainer.get("expert_parallel") is True)
    return num_experts


def _check_patches(cfg: DictConfig) -> None:
    """The image side must be a multiple of the patch size (the ViT tiles the image with patches)."""
    m, d = cfg.model, cfg.data
    kwargs = m.timm_kwargs or {}
    found = re.search(r"patch(\d+)", str(m.name))
    patch = kwargs.get("patch_size") or (int(found.group(1)) if found else None)
    size = kwargs.get("img_size") or d.get("img_size") or NATIVE_IMG_SIZE.get(d.name)
    if patch is None or size is None:
        return
    key = "model.timm_kwargs.patch_size" if kwargs.get("patch_size") else "model.name"
    if isinstance(size, int) and isinstance(patch, int) and (patch < 1 or size % patch):
        value = patch if key.endswith("patch_size") else m.name
        raise ConfigError(key, value, f"the patch size {patch} must divide the image size {size} of data.name={d.name} "
                               "(set model.timm_kwargs.patch_size to a divisor, or data.img_size for imagefolder)")


def build_model(cfg: DictConfig, data) -> torch.nn.Module:
    """The configured V-MoE (or dense ViT) for ``data``'s image size, channels and classes."""
    m = cfg.model
    router = hydra.utils.instantiate(m.router) if m.router is not None else None
    placement = m.placement if isinstance(m.placement, str) else list(m.placement)
    kwargs = dict(OmegaConf.to_container(m.timm_kwargs, resolve=True) or {})
    kwargs.setdefault("img_size", data.img_size)
    kwargs.setdefault("in_chans", data.in_chans)
    kwargs.setdefault("num_classes", data.num_classes)
    return timm.create_model(
        m.name, moe=m.moe, num_experts=m.num_experts, router=router, placement=placement, num_last=m.num_last,
        group_size=m.group_size, num_shared_experts=m.num_shared_experts, expert_impl=m.expert_impl,
        upcycle_from=m.upcycle_from, **kwargs)


def classification_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y), {}


def evaluate_classifier(model, batches) -> dict:
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in batches:
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    return {"acc": correct / max(1, n), "loss": loss_sum / max(1, n)}
