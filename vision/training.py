"""Vision's training pieces: the config checks, the timm model, cross-entropy and top-1 accuracy
(used by ``vision.train.VisionTask``)."""

from __future__ import annotations

import re
from pathlib import Path

import hydra
import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import vision  # noqa: F401  (registers vmoe_* with timm)
from core.checks import (ConfigError, check_int, check_number, check_readable_dir, check_readable_file,
                         to_config_error)
from core.engine import is_training_checkpoint
from core.experts import IMPLS
from core.surgery import PLACEMENTS, moe_block_indices
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
    check_int("model.num_shared_experts", m.get("num_shared_experts", 0), minimum=0)
    if m.get("timm_kwargs") is not None and not OmegaConf.is_dict(m.timm_kwargs):
        raise ConfigError("model.timm_kwargs", m.timm_kwargs, "a mapping of VisionTransformer arguments, e.g. "
                          "{embed_dim: 96, depth: 6}")
    vit = _vit_args(m)
    key = {k: (f"model.timm_kwargs.{k}" if k in (m.timm_kwargs or {}) else "model.name") for k in vit}
    for name in ("depth", "embed_dim", "num_heads", "patch_size"):
        if name in vit and not (isinstance(vit[name], int) and not isinstance(vit[name], bool) and vit[name] >= 1):
            raise ConfigError(key[name], vit[name] if key[name] != "model.name" else m.name, f"{name} must be an "
                              "integer >= 1")
    if "mlp_ratio" in vit:
        check_number(key["mlp_ratio"], vit["mlp_ratio"], gt=0)
    if vit.get("embed_dim", 0) % vit.get("num_heads", 1):
        raise ConfigError(key["num_heads"], vit["num_heads"], f"the heads must divide embed_dim={vit['embed_dim']}")
    if m.moe and "depth" in vit:
        try:
            moe_block_indices(vit["depth"], OmegaConf.to_container(placement) if OmegaConf.is_list(placement)
                              else placement, m.get("num_last"), key="model.placement")
        except ValueError as err:
            if str(err).startswith("num_last="):
                raise ConfigError("model.num_last", m.get("num_last"), "with model.placement=last_n "
                                  + str(err).split(": ", 1)[-1]) from None
            raise to_config_error(err, "model.") from None
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
    check_int("data.crop_padding", d.get("crop_padding", 0), minimum=0)
    if d.name == "imagefolder":
        root = check_readable_dir("data.root", d.root, ": the image folder with train/ and val/ class subfolders")
        check_int("data.img_size", d.get("img_size"))
        for key in ("train_dir", "test_dir"):
            check_readable_dir(f"data.{key}", str(root / str(d.get(key))),
                               f": data.root must hold the {key.split('_')[0]} images in <{key}>/<class>/*.jpg")
    if m.get("upcycle_from") is not None:
        _check_weights_file("model.upcycle_from", m.upcycle_from)
    _check_patches(cfg)
    num_experts = m.num_experts if m.num_experts is not None else 8
    if not m.moe:
        return None
    try:
        check_router(router, num_experts, key="router", domain="vision", group_size=m.group_size,
                     group_key="model.group_size", expert_parallel=cfg.trainer.get("expert_parallel") is True)
    except ConfigError as err:
        if err.key == "router.num_experts":  # the router's weights would not fit: the model's key is at fault
            raise ConfigError("model.num_experts", num_experts, err.allowed) from None
        raise
    return num_experts


def _vit_args(m: DictConfig) -> dict:
    """The ``VisionTransformer`` arguments ``model.name``'s timm entry point builds with (its own values,
    then ``model.timm_kwargs``), read without building the model: the entry points end in
    ``vision.models.create_vmoe(name, pretrained, **args)``, which is stood in for here."""
    import vision.models as models

    kwargs = OmegaConf.to_container(m.timm_kwargs, resolve=True) if m.get("timm_kwargs") else {}
    captured: dict = {}
    build = models.create_vmoe
    models.create_vmoe = lambda variant, pretrained=False, **args: captured.update(args)
    try:
        timm.models.model_entrypoint(m.name)(**kwargs)
    except Exception:  # noqa: BLE001  (an entry point of another shape: leave its checks to the build)
        return {}
    finally:
        models.create_vmoe = build
    return captured


def _check_weights_file(key: str, path) -> None:
    """``path`` names a readable file that ``torch.load`` can read (a ``torch.save``d state dict, such as
    a dense run's ``model.pt``); only its first bytes are read here."""
    hint = ": the dense ViT's weights, e.g. <dense run>/model.pt (trainer.save_model=true writes it)"
    if Path(str(path)).expanduser().is_dir():
        found = Path(str(path)).expanduser() / "model.pt"
        also = f" (use {found})" if found.is_file() else ""
        raise ConfigError(key, str(path), f"it is a directory{also}, not a file{hint}")
    p = check_readable_file(key, path, hint)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise ConfigError(key, str(path), f"the file cannot be read ({err.strerror})") from None
    if is_training_checkpoint(p):
        raise ConfigError(key, str(path), "it is a training checkpoint, not plain weights; give the dense run's "
                          "model.pt (trainer.save_model=true writes it)")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise ConfigError(key, str(path), f"it is not a PyTorch weights file (torch.save){hint}")


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
