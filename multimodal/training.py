"""The multimodal domain's training pieces: config checks, the contrastive loss, the evaluation and
the loaders (``multimodal.train.MultimodalTask`` puts them together for ``core.run``).

The loss is open_clip's ``ClipLoss`` (symmetric InfoNCE) plus the routers' auxiliary losses (the
engine adds them; LIMoE's entropy terms sit on its routers). Under torchrun it is built with the
process group's rank and world size, ``local_loss=False, gather_with_grad=True``, as open_clip
trains: every rank gathers the features of all ranks and contrasts each image with every caption of
the global batch (global negatives); in one process it is the plain loss. Evaluation, written to
``metrics.json``:

- ``val_*``: held-out pairs (no image of them was trained on): contrastive loss over the whole
  held-out set, image→text and text→image recall@1/@5, expert usage per modality and the share of
  text (image) assignments that go to the most used expert (1/E balanced, 1.0 collapsed);
- ``zeroshot_acc``: Fashion-MNIST test accuracy from class-name prompts (prompt-ensembled, Radford
  et al., ICML 2021), the classifier built by ``open_clip.build_zero_shot_classifier``;
- ``mix_*`` (MoE models): routing by modality on held-out pairs of every training source in their
  training proportions (retrieval is not scored there: Fashion-MNIST captions repeat).

LIMoE runs also log the per-modality top-expert shares of every training batch to ``history.jsonl``.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
from omegaconf import DictConfig
from open_clip import build_zero_shot_classifier
from open_clip.loss import ClipLoss

from core.checks import (ConfigError, NotApplicableError, check_int, check_number, check_readable_dir,
                         check_readable_file, check_target, check_whole_groups, to_config_error)
from core.distributed import env_world_size, get_rank, get_world_size
from core.validate import check_router
from multimodal.data import MultimodalData, labelled_loader, pair_loader
from multimodal.factory import moe_model_names
from multimodal.models import LIMoE, check_routing_groups, modality_usage, reset_modality_usage

__all__ = ["build_loaders", "clip_loss", "context_length", "contrastive_loss", "is_moe", "make_evaluate",
           "recall_at_k", "validate_config"]

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100
SOURCES = ("openmoji", "fashion_mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")

_local_clip_loss = ClipLoss()  # evaluation: every process scores the whole held-out set by itself


@functools.lru_cache(maxsize=None)
def _clip_loss_of(rank: int, world_size: int) -> ClipLoss:
    return ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)


def contrastive_loss() -> ClipLoss:
    """open_clip's ``ClipLoss`` for this process's group (read when called: the engine joins the group
    after the task is built): global negatives over all ranks, gradients through the gathered
    features (each rank's loss is the global one; the engine weights it by the rank's share of the
    batch and sums the gradients, which gives the global loss's gradient)."""
    return _clip_loss_of(get_rank(), get_world_size())


def validate_config(cfg: DictConfig) -> int | None:
    """Check ``cfg`` (``conf/multimodal/train.yaml``) before any data is read or model built: the model
    target, architecture name and image size, the router, the data sources and sizes; raises
    ``ConfigError`` naming the key. Returns the experts of a MoE layer (None for the dense CLIP)."""
    m, d = cfg.model, cfg.data
    check_target("model._target_", m.get("_target_"), hint=": use model=<name> with a conf/multimodal/model config")
    if "model_name" in m:
        names = open_clip.list_models()
        moe_names = moe_model_names()
        local = sorted(n for n in names if n.startswith("mm-") and n not in moe_names)
        if m.model_name not in names:
            raise ConfigError("model.model_name", m.model_name,
                              f"use an open_clip architecture: this project's are {local}")
        if m.model_name in moe_names:
            raise ConfigError("model.model_name", m.model_name,
                              f"a *-MoE config is for open_clip.create_model (its MoE settings are in its JSON); a "
                              f"run takes a dense architecture {local} and model=clip_moe or model=limoe")
        size = (open_clip.get_model_config(m.model_name) or {}).get("vision_cfg", {}).get("image_size")
        if isinstance(size, int) and d.image_size != size:
            raise ConfigError("data.image_size", d.image_size, f"model.model_name={m.model_name} takes "
                              f"{size}x{size} images: set data.image_size={size}")
    elif "patch_size" in m:
        check_int("model.patch_size", m.patch_size)
        check_int("data.image_size", d.image_size)
        if d.image_size % m.patch_size:
            raise ConfigError("data.image_size", d.image_size, f"it must be a multiple of "
                              f"model.patch_size={m.patch_size} (the image is cut into patches)")
    num_experts = m.get("num_experts")
    if num_experts is not None:
        check_int("model.num_experts", num_experts)
        check_int("model.group_size", m.get("group_size"), optional=True)
        check_int("model.routing_group_size", m.get("routing_group_size"), optional=True)
        try:
            router = check_router(m.get("router"), num_experts, key="router", domain="multimodal",
                                  group_size=m.get("group_size"), group_key="model.group_size")
        except ConfigError as err:
            if err.key == "router.num_experts":  # the router's weights would not fit: the model's key is at fault
                raise ConfigError("model.num_experts", num_experts, err.allowed) from None
            raise
        if m.get("routing_group_size") is not None:
            _check_limoe_groups(m, d, router)
    for key in ("local_entropy_weight", "global_entropy_weight"):
        if key in m:
            _check_per_modality(f"model.{key}", m[key], lambda k, v: check_number(k, v, ge=0))
    if "global_min_experts" in m:
        def min_experts(key, v):
            check_number(key, v, ge=1, optional=True)
            if v is not None and num_experts is not None and v > num_experts:
                raise ConfigError(key, v, f"it must be null or in [1, model.num_experts={num_experts}]")

        _check_per_modality("model.global_min_experts", m.global_min_experts, min_experts)
    for key in ("sources", "val_sources"):
        for name in d.get(key) or []:
            if name not in SOURCES:
                raise ConfigError(f"data.{key}", list(d[key]), f"every source must be one of {list(SOURCES)}")
    if not d.sources:
        raise ConfigError("data.sources", [], f"give at least one of {list(SOURCES)}")
    if d.get("root") is not None:
        root = check_readable_dir("data.root", d.root, ": the folder with the Fashion-MNIST IDX .gz files, or null")
        if "fashion_mnist" in list(d.sources) + list(d.get("val_sources") or []) or d.get("zeroshot"):
            missing = [f for f in FASHION_MNIST_FILES if not (root / f).is_file()]
            if missing:  # the loader would quietly fall back to the system's copy
                raise ConfigError("data.root", str(d.root), f"it lacks the Fashion-MNIST file(s) {missing}: give the "
                                  "folder holding the four IDX .gz files, or null for the system's copy")
    check_number("data.val_fraction", d.get("val_fraction", 0.1), gt=0)
    if not d.get("val_fraction", 0.1) < 1:
        raise ConfigError("data.val_fraction", d.val_fraction, "it must lie in (0, 1)")
    if d.get("openmoji_cache") is not None:
        _check_cache_file("data.openmoji_cache", d.openmoji_cache)
    for key in ("dense_checkpoint", "checkpoint"):
        if m.get(key) is not None:
            _check_checkpoint(f"model.{key}", m[key])
    check_int("data.batch_size", d.batch_size, minimum=2)  # a contrastive batch needs negatives
    world = env_world_size()
    if world > 1 and d.batch_size % world:  # open_clip gathers equal-sized feature blocks from the ranks
        raise ConfigError("data.batch_size", d.batch_size, f"under torchrun it must be a multiple of the "
                          f"WORLD_SIZE={world} processes (the CLIP loss gathers equal shares of every batch)")
    check_int("data.eval_batch_size", d.eval_batch_size)
    for key in ("limit_train", "limit_eval", "fashion_mnist_train"):
        check_int(f"data.{key}", d.get(key), optional=True)
    return num_experts


def _check_limoe_groups(m: DictConfig, d: DictConfig, router) -> None:
    """LIMoE's routing groups of ``model.routing_group_size`` pairs (``multimodal.models``): evaluation
    batches hold whole groups where the router's evaluation depends on its group
    (``Router.eval_group_dependent``), and the router takes groups of that many pairs' tokens (joint, image
    only, text only)."""
    group = m.routing_group_size
    check_int("data.eval_batch_size", d.eval_batch_size)
    if router is None or router.eval_group_dependent:   # None: LIMoE's own router (top-1 with capacity)
        check_whole_groups("data.eval_batch_size", d.eval_batch_size, "model.routing_group_size", group, "pairs")
    if router is None or "patch_size" not in m:
        return
    try:
        check_routing_groups(router, group, (d.image_size // m.patch_size) ** 2 + 1, context_length(m))
    except ValueError as err:
        raise to_config_error(err, "model.", cls=NotApplicableError) from None


def _check_cache_file(key: str, path) -> None:
    """A cache file read when present, else written: an existing regular file, or a new one whose folder
    exists (or can be made) and is writable."""
    p = Path(str(path)).expanduser()
    if p.exists():
        check_readable_file(key, path, ": an .npz cache file (read when present, else written)")
        with open(p, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # np.savez_compressed writes a zip
                raise ConfigError(key, str(path), "the file is not an .npz cache (numpy's savez); give the cache "
                                  "this run wrote, a path where it may write one, or null")
        return
    parent = next((q for q in [p.parent, *p.parent.parents] if q.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), f"the file does not exist and cannot be written there ({parent} is not a "
                          "writable folder); give an .npz path in a writable folder, or null")


def _check_per_modality(key: str, value, check) -> None:
    """Two values, one per modality (image, text), each passing ``check(key, value)``."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        raise ConfigError(key, values, "give two values, one per modality: [image, text]")
    for i, v in enumerate(values):
        check(f"{key}[{i}]", v)


def _check_checkpoint(key: str, path) -> None:
    """A dense parent for upcycling: a run directory with ``checkpoints/``, a ``checkpoints`` folder, or a
    file (a ``core.engine`` checkpoint or a ``torch.save``d state dict), as ``multimodal.models.load_state_dict``
    reads it."""
    hint = ": the run directory of a model=clip run (or its checkpoints/last.ckpt, or a saved state dict)"
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ConfigError(key, str(path), f"no such file or directory (looked at {p.resolve()}){hint}")
    if p.is_dir():
        where = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if not any((where / name).is_file() for name in ("last.ckpt", "prev.ckpt")):
            raise ConfigError(key, str(path), f"there is no checkpoint in it (looked for last.ckpt and prev.ckpt "
                              f"in {where}){hint}")
        return
    check_readable_file(key, path, hint)


def context_length(m: DictConfig) -> int:
    """Text tokens per caption of the model config ``m``, without building the model (the data is
    tokenised first): the open_clip architecture's ``text_cfg``, else LIMoE's ``context_length``."""
    if "model_name" in m:
        return int(open_clip.get_model_config(m.model_name)["text_cfg"]["context_length"])
    return int(m.get("context_length", 32))  # LIMoE's default


def is_moe(model: torch.nn.Module) -> bool:
    from core.moe import MoE
    return any(isinstance(m, MoE) for m in model.modules())


def build_loaders(cfg: DictConfig, data: MultimodalData, routing: bool = True):
    """The training loader and ``{"val", "zeroshot", "mix"}`` evaluation loaders (``mix``: routing
    statistics, MoE models only)."""
    d = cfg.data
    train_loader = pair_loader(data.train, d.batch_size, train=True)
    eval_loaders = {"val": pair_loader(data.val, d.eval_batch_size)}
    if data.zeroshot is not None:
        eval_loaders["zeroshot"] = labelled_loader(data.zeroshot, d.eval_batch_size)
    if routing and data.mix is not None:
        eval_loaders["mix"] = pair_loader(data.mix, d.eval_batch_size, routing_only=True)
    return train_loader, eval_loaders


def clip_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """open_clip's ``ClipLoss`` on one batch; the temperature is clamped first, as CLIP does."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    image_features, text_features, logit_scale = model(batch["image"], batch["text"])
    logs = {"logit_scale": float(logit_scale.detach())}
    if isinstance(model, LIMoE):  # routing by modality in this training batch (joint group, noisy router)
        usage = modality_usage(model)
        model.modality_tokens_LME.zero_()
        model.modality_choices_LME.zero_()
        logs.update({f"{m}_{k}": usage[f"{m}_{k}"] for m in ("image", "text")
                     for k in ("top_expert_share", "top_choice_share")})
    return contrastive_loss()(image_features, text_features, logit_scale), logs


def recall_at_k(sim_NN: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Recall@k of the matching pair (the diagonal) in each row of a similarity matrix."""
    target = sim_NN.diagonal()[:, None]
    rank_N = (sim_NN > target).sum(1)  # ties count in the pair's favour
    return {f"r{k}": float((rank_N < k).float().mean()) for k in ks}


def make_evaluate(tokenizer: Callable | None = None, class_names: Sequence[str] = (), templates: Sequence[str] = ()):
    """``evaluate(model, batches)`` for the engine: retrieval batches (``image``, ``text``) or
    zero-shot batches (``image``, ``label``) against the classifier ``open_clip.build_zero_shot_classifier``
    makes of the class names in every template (``"a photo of a {}."``), tokenised by ``tokenizer``:
    each class's prompt features averaged and normalised. All prompts are encoded in one batch (LIMoE
    routes them in its fixed groups of ``routing_group_size`` captions)."""

    @torch.no_grad()
    def evaluate(model, batches) -> dict:
        reset_modality_usage(model)
        img, txt, labels = [], [], []
        routing_only = False
        for batch in batches:
            routing_only = routing_only or bool(batch.get("routing_only", False))
            if "text" in batch:
                i, t, _ = model(batch["image"], batch["text"])
                img.append(i)
                txt.append(t)
            else:
                img.append(model.encode_image(batch["image"], normalize=True))
                labels.append(batch["label"])
        if not img:
            return {}
        image_features = torch.cat(img).float()
        if labels:
            dev = image_features.device
            classifier_EC = build_zero_shot_classifier(model, tokenizer, list(class_names), list(templates),
                                                       num_classes_per_batch=None, device=dev)
            pred = (image_features @ classifier_EC.float()).argmax(-1)
            return {"acc": float((pred == torch.cat(labels).to(dev)).float().mean())}
        out = {}
        if not routing_only:
            text_features = torch.cat(txt).float()
            scale = model.logit_scale.exp().clamp(max=100.0)
            sim = image_features @ text_features.T
            out["loss"] = float(_local_clip_loss(image_features, text_features, scale))
            out.update({f"i2t_{k}": v for k, v in recall_at_k(sim).items()})
            out.update({f"t2i_{k}": v for k, v in recall_at_k(sim.T).items()})
        if is_moe(model):
            usage = modality_usage(model)
            out["text_top_expert_share"] = usage["text_top_expert_share"]
            out["image_top_expert_share"] = usage["image_top_expert_share"]
            for key in ("text_top_choice_share", "image_top_choice_share"):  # LIMoE's collapse measure
                if usage.get(key) is not None:
                    out[key] = usage[key]
            out["expert_usage"] = {m: usage[m] for m in ("image", "text")}
        return out

    return evaluate
