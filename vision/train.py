"""Train a V-MoE (or its dense ViT baseline) image classifier: ``python -m vision.train [overrides]``.

``train(cfg)`` does the work and returns the metrics (tests call it with a composed config);
``main`` is the thin Hydra entry point. See ``conf/vision.yaml`` for the usual overrides.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import vision  # noqa: F401  (registers vmoe_* with timm)
from core.cli import run_main
from core.engine import Trainer, TrainerConfig, seed_everything
from core.experts import IMPLS
from core.surgery import PLACEMENTS
from core.runs import run_dir
from core.checks import ConfigError, check_int, check_readable_dir
from core.validate import check_router, check_trainer
from vision.data import AUGMENTATIONS, DATASETS, build_loaders, load_dataset

log = logging.getLogger(__name__)


# image side of the datasets that are not resized (imagefolder's is data.img_size)
NATIVE_IMG_SIZE = {"digits": 8, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}


def validate_config(cfg: DictConfig) -> None:
    """Check the config before any data is read or model built; raises ``ValueError`` naming the
    key, its value and what is allowed."""
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
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError("seed", cfg.seed, "it must be an integer")
    if d.name == "imagefolder":
        check_readable_dir("data.root", d.root, ": the image folder with train/ and val/ class subfolders")
    _check_patches(cfg)
    num_experts = m.num_experts if m.num_experts is not None else 8
    if m.moe:
        check_router(router, num_experts, key="router", domain="vision", group_size=m.group_size,
                     group_key="model.group_size")
    check_trainer(cfg.trainer, num_experts if m.moe else None)


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


def router_name(cfg: DictConfig) -> str:
    """The router's public name: ``router_name`` when set, else the ``+router=`` choice, else the
    model's default; ``none`` for dense."""
    if not cfg.model.moe:
        return "none"
    if cfg.get("router_name"):
        return str(cfg.router_name)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("router")
        if choice:
            return choice
    router = cfg.model.router
    if router is None:
        return cfg.model.default_router
    # composed without Hydra's runtime (tests): name the module of the router class
    return str(router._target_).rsplit(".", 2)[-2]


def build_model(cfg: DictConfig, data) -> torch.nn.Module:
    """The configured V-MoE (or dense ViT) for ``data``'s image size, channels and classes."""
    m = cfg.model
    router = hydra.utils.instantiate(m.router) if m.router is not None else None
    placement = m.placement if isinstance(m.placement, str) else list(m.placement)
    kwargs = dict(OmegaConf.to_container(m.timm_kwargs, resolve=True) or {})
    kwargs.setdefault("img_size", data.img_size)
    kwargs.setdefault("in_chans", data.in_chans)
    kwargs.setdefault("num_classes", data.num_classes)
    try:
        return timm.create_model(
            m.name, moe=m.moe, num_experts=m.num_experts, router=router, placement=placement, num_last=m.num_last,
            group_size=m.group_size, num_shared_experts=m.num_shared_experts, expert_impl=m.expert_impl,
            upcycle_from=m.upcycle_from, **kwargs)
    except ValueError as err:
        raise ValueError(f"building {m.name} with router {router_name(cfg)}: {err}") from err


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


def output_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg.get("output_dir"))


def prepare(cfg: DictConfig):
    """Validate, load the data and build the model: everything that can fail because of the config.
    Returns ``(trainer, model, train_loader, test_loader)``."""
    validate_config(cfg)
    trainer_cfg = TrainerConfig.from_mapping(OmegaConf.to_container(cfg.trainer, resolve=True))
    d = cfg.data
    data = load_dataset(d.name, d.root, d.download, d.img_size, d.system_dir, d.train_dir, d.test_dir)
    train_loader, test_loader = build_loaders(data, d.batch_size, d.eval_batch_size, d.augment, d.crop_padding,
                                              d.limit_train, d.limit_eval)
    seed_everything(cfg.seed)
    model = build_model(cfg, data)
    info = {"domain": "vision", "router": router_name(cfg),
            "model": cfg.model.name if cfg.model.moe else f"{cfg.model.name} (dense)",
            "moe_blocks": list(getattr(model, "moe_blocks", [])),
            "num_experts": cfg.model.num_experts if cfg.model.moe else 0,
            "dataset": d.name, "train_examples": train_loader.num_examples, "test_examples": test_loader.num_examples}
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return Trainer(trainer_cfg, out, seed=cfg.seed, info=info), model, train_loader, test_loader


def train(cfg: DictConfig) -> dict:
    """Prepare, train and evaluate; returns ``metrics.json``'s content."""
    return fit(prepare(cfg))


def summary(metrics: dict) -> str:
    """A short human summary of a finished run."""
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    return "\n".join([
        f"{metrics['model']} on {metrics['dataset']}, router {metrics['router']}: "
        f"{metrics['epochs']} epochs, {metrics['steps']} steps, {metrics['wall_time_s'] / 60:.1f} min on {metrics['device']}",
        f"  test accuracy   {100 * metrics['test_acc']:.2f}%  (test loss {metrics['test_loss']:.4f})",
        f"  throughput      {metrics['examples_per_s']:.0f} images/s training, "
        f"{metrics['test_examples_per_s']:.0f} images/s evaluation",
        f"  parameters      {metrics['params_total'] / 1e6:.3f}M total, {metrics['params_active'] / 1e6:.3f}M active per image",
        f"  load balance    CV² {fmt(metrics['load_cv2'], '.4f')}, dropped {fmt(metrics['dropped_fraction'], '.2%')} of "
        f"choices, {fmt(metrics['experts_per_token'], '.2f')} experts per token",
    ])


def fit(prepared) -> dict:
    """Train prepared pieces (``prepare``'s result); returns the metrics."""
    trainer, model, train_loader, test_loader = prepared
    return trainer.fit(model, train_loader, classification_loss, evaluate_classifier, {"test": test_loader})


def _report(metrics: dict) -> float:
    print(summary(metrics))
    return metrics["test_acc"]


@hydra.main(config_path="pkg://conf", config_name="vision", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Config and data errors: one line, exit 2; a non-finite loss: exit 1. In a sweep, a router that
    cannot route images (hash routing) or a model that cannot be built with it gets an n/a row."""
    return run_main(cfg, "vision", validate=validate_config, prepare=prepare, fit=fit, out_dir=output_dir,
                    row=lambda cfg: {"router": router_name(cfg)}, not_applicable=(ValueError,), objective=_report)


if __name__ == "__main__":
    main()
