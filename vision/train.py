"""Train a V-MoE (or its dense ViT baseline) image classifier: ``python -m vision.train [overrides]``.

``train(cfg)`` does the work and returns the metrics (tests call it with a composed config);
``main`` is the thin Hydra entry point. See ``conf/vision.yaml`` for the usual overrides.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import vision  # noqa: F401  (registers vmoe_* with timm)
from core.engine import NonFiniteLossError, Trainer, TrainerConfig, seed_everything
from core.surgery import PLACEMENTS
from core.runs import run_dir
from vision.data import AUGMENTATIONS, DATASETS, build_loaders, load_dataset

log = logging.getLogger(__name__)


def _fail(key: str, value, allowed: str) -> None:
    raise ValueError(f"{key}={value!r} is not allowed: {allowed}.")


def _positive_int_or_none(key: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        _fail(key, value, "it must be a positive integer or null")


def validate_config(cfg: DictConfig) -> None:
    """Check the config before any data is read or model built; raises ``ValueError`` naming the
    key, its value and what is allowed."""
    names = timm.list_models("vmoe_*")
    m, d = cfg.model, cfg.data
    if m.name not in names:
        _fail("model.name", m.name, f"use one of {names}")
    if not isinstance(m.moe, bool):
        _fail("model.moe", m.moe, "true or false")
    _positive_int_or_none("model.num_experts", m.num_experts)
    placement = m.placement
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            _fail("model.placement", placement, f"use one of {list(PLACEMENTS)} or a list of block indices")
    elif not OmegaConf.is_list(placement):
        _fail("model.placement", placement, f"use one of {list(PLACEMENTS)} or a list of block indices")
    _positive_int_or_none("model.group_size", m.group_size)
    if m.expert_impl not in ("auto", "grouped", "loop"):
        _fail("model.expert_impl", m.expert_impl, "use auto, grouped or loop")
    router = m.router
    if router is not None and (not OmegaConf.is_dict(router) or "_target_" not in router):
        _fail("router", router, "a conf/router/<name>.yaml choice, e.g. +router=topk")
    if d.name not in DATASETS:
        _fail("data.name", d.name, f"use one of {list(DATASETS)}")
    if d.augment not in AUGMENTATIONS:
        _fail("data.augment", d.augment, f"use one of {list(AUGMENTATIONS)}")
    for key in ("batch_size", "eval_batch_size", "limit_train", "limit_eval"):
        _positive_int_or_none(f"data.{key}", d.get(key))
    if d.batch_size is None:
        _fail("data.batch_size", None, "it must be a positive integer")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        _fail("seed", cfg.seed, "it must be an integer")
    TrainerConfig.from_mapping(OmegaConf.to_container(cfg.trainer, resolve=True))


def router_name(cfg: DictConfig) -> str:
    """The router's public name: the ``+router=`` choice, else the model's default; ``none`` for dense."""
    if not cfg.model.moe:
        return "none"
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
    trainer, model, train_loader, test_loader = prepare(cfg)
    return trainer.fit(model, train_loader, classification_loss, evaluate_classifier, {"test": test_loader})


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


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="pkg://conf", config_name="vision", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        trainer, model, train_loader, test_loader = prepare(cfg)
    except (ValueError, FileNotFoundError) as err:
        # configuration and data problems: one clear line, no traceback
        if not (isinstance(err, ValueError) and _is_multirun()):
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        # in a sweep, a router that cannot route images (e.g. hash routing) gets an n/a row
        out = output_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(
            {"domain": "vision", "router": router_name(cfg), "status": "n/a", "reason": str(err)}, indent=2) + "\n")
        print(f"n/a: {err}", file=sys.stderr)
        return None
    try:
        metrics = trainer.fit(model, train_loader, classification_loss, evaluate_classifier, {"test": test_loader})
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(summary(metrics))
    return metrics["test_acc"]


if __name__ == "__main__":
    main()
