"""Train a dense CLIP, a CLIP-MoE or a LIMoE contrastively on the shared engine (``core.engine``).

``python -m multimodal.train`` trains the default CLIP-MoE (CLIP-MoE's router: top-2 renormalised)
on OpenMoji + Fashion-MNIST pairs; ``+router=expert_choice`` swaps the router, ``model=clip`` is the
dense baseline, ``model=limoe`` the one-tower LIMoE (``experiment=multimodal_limoe_no_entropy`` turns
its entropy losses off). ``model=limoe`` is short for ``model=multimodal/limoe`` (``conf/model/limoe.yaml``).

The loss is open_clip's ``ClipLoss`` (symmetric InfoNCE) plus the routers' auxiliary losses (the
engine adds them; LIMoE's entropy terms sit on its routers). Evaluation, written to ``metrics.json``:

- ``val_*``: held-out pairs (no image of them was trained on): contrastive loss over the whole
  held-out set, image→text and text→image recall@1/@5, expert usage per modality and the share of
  text (image) assignments that go to the most used expert (1/E balanced, 1.0 collapsed);
- ``zeroshot_acc``: Fashion-MNIST test accuracy from class-name prompts (prompt-ensembled, Radford
  et al., ICML 2021);
- ``mix_*`` (MoE models): routing by modality on held-out pairs of every training source in their
  training proportions (retrieval is not scored there: Fashion-MNIST captions repeat).

LIMoE runs also log the per-modality top-expert shares of every training batch to ``history.jsonl``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from open_clip.loss import ClipLoss

from core.cli import run_main
from core.engine import Trainer, TrainerConfig, seed_everything
from core.runs import hydra_choice, run_dir
from core.checks import ConfigError, check_int, check_readable_dir, check_target
from core.validate import check_router, check_trainer
from multimodal.data import MultimodalData, build_data, labelled_loader, pair_loader
from multimodal.models import LIMoE, modality_usage, reset_modality_usage

log = logging.getLogger(__name__)

__all__ = ["build_model", "clip_loss", "make_evaluate", "main", "recall_at_k", "train", "validate_config"]

DOMAIN = "multimodal"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100

_clip_loss = ClipLoss()


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The model of ``cfg.model`` (its ``router`` key reads the top-level ``router`` group)."""
    return hydra.utils.instantiate(cfg.model)


def is_moe(model: torch.nn.Module) -> bool:
    from core.moe import MoE
    return any(isinstance(m, MoE) for m in model.modules())


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
    return _clip_loss(image_features, text_features, logit_scale), logs


def recall_at_k(sim_NN: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Recall@k of the matching pair (the diagonal) in each row of a similarity matrix."""
    target = sim_NN.diagonal()[:, None]
    rank_N = (sim_NN > target).sum(1)  # ties count in the pair's favour
    return {f"r{k}": float((rank_N < k).float().mean()) for k in ks}


def make_evaluate(class_tokens_CTL: torch.Tensor | None):
    """``evaluate(model, batches)`` for the engine: retrieval batches (``image``, ``text``) or
    zero-shot batches (``image``, ``label``) against the class prompts ``class_tokens_CTL``
    (C classes × T templates × L tokens)."""

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
            C, T, L = class_tokens_CTL.shape
            dev = image_features.device
            text_CTE = model.encode_text(class_tokens_CTL.reshape(C * T, L).to(dev), normalize=True).view(C, T, -1)
            classifier_CE = F.normalize(text_CTE.float().mean(1), dim=-1)
            pred = (image_features @ classifier_CE.T).argmax(-1)
            return {"acc": float((pred == torch.cat(labels).to(dev)).float().mean())}
        out = {}
        if not routing_only:
            text_features = torch.cat(txt).float()
            scale = model.logit_scale.exp().clamp(max=100.0)
            sim = image_features @ text_features.T
            out["loss"] = float(_clip_loss(image_features, text_features, scale))
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


# ------------------------------------------------------------------------------------------- train


def router_label(cfg: DictConfig, model: torch.nn.Module) -> str:
    """The run's row name: ``none`` (dense, the baseline row of ``core.compare``), the ``+router=`` choice,
    or the model's own router."""
    if not is_moe(model):
        return "none"
    if cfg.get("router_name"):
        return str(cfg.router_name)
    if cfg.get("router") is None:
        r = cfg.model.get("default_router") or {}
        parts = [str(r.get("_target_", "TopKRouter")).rsplit(".", 1)[-1]]
        parts += [f"k={r.top_k}"] if "top_k" in r else []
        parts += ["bpr"] if r.get("batch_priority") else []
        parts += ["renormalized"] if r.get("renormalize") else []
        return f"default ({' '.join(parts)})"
    return hydra_choice("router") or str(cfg.router.get("_target_", "custom")).rsplit(".", 1)[-1]


def _out_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg.get("out_dir"), "outputs/multimodal/run")


def build_loaders(cfg: DictConfig, data: MultimodalData, routing: bool = True):
    d = cfg.data
    train_loader = pair_loader(data.train, d.batch_size, train=True)
    eval_loaders = {"val": pair_loader(data.val, d.eval_batch_size)}
    if data.zeroshot is not None:
        eval_loaders["zeroshot"] = labelled_loader(data.zeroshot, d.eval_batch_size)
    if routing and data.mix is not None:
        eval_loaders["mix"] = pair_loader(data.mix, d.eval_batch_size, routing_only=True)
    return train_loader, eval_loaders


def prepare(cfg: DictConfig) -> tuple:
    """Read the data and build the model and the trainer of ``cfg`` (``conf/multimodal.yaml``); its
    errors are configuration or data errors. Writes the resolved ``config.yaml`` into the run directory."""
    out_dir = _out_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    model = build_model(cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
    d = cfg.data
    data = build_data(
        tokenizer, sources=list(d.sources), image_size=d.image_size, val_fraction=d.val_fraction,
        val_sources=list(d.val_sources), limit_train=d.limit_train, limit_eval=d.limit_eval,
        fashion_mnist_train=d.fashion_mnist_train, zeroshot=d.zeroshot, root=d.root,
        openmoji_cache=d.get("openmoji_cache"), seed=int(cfg.seed))
    train_loader, eval_loaders = build_loaders(cfg, data, routing=is_moe(model))
    class_tokens = tokenizer([t.format(c) for c in data.class_names for t in data.templates])
    class_tokens = class_tokens.view(len(data.class_names), len(data.templates), -1)

    label = router_label(cfg, model)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer_cfg = TrainerConfig.from_mapping(OmegaConf.to_container(cfg.trainer, resolve=True))
    info = {"domain": DOMAIN, "router": label, "model": cfg.get("model_name") or hydra_choice("model") or "custom",
            "train_pairs": len(data.train), "val_pairs": len(data.val),
            "zeroshot_images": 0 if data.zeroshot is None else len(data.zeroshot)}
    log.info("multimodal: model=%s router=%s, %.2fM parameters, %d training pairs", info["model"], label,
             sum(p.numel() for p in model.parameters()) / 1e6, len(data.train))
    trainer = Trainer(trainer_cfg, out_dir, seed=int(cfg.seed), info=info)
    return trainer, model, train_loader, eval_loaders, class_tokens


def fit(prepared: tuple) -> dict:
    """Train a prepared run; returns the metrics also written to ``metrics.json``."""
    trainer, model, train_loader, eval_loaders, class_tokens = prepared
    metrics = trainer.fit(model, train_loader, clip_loss, make_evaluate(class_tokens), eval_loaders=eval_loaders)
    log.info("multimodal: val i2t R@1=%.3f R@5=%.3f t2i R@1=%.3f R@5=%.3f zero-shot=%.3f text top-expert share=%s",
             metrics.get("val_i2t_r1", float("nan")), metrics.get("val_i2t_r5", float("nan")),
             metrics.get("val_t2i_r1", float("nan")), metrics.get("val_t2i_r5", float("nan")),
             metrics.get("zeroshot_acc", float("nan")), metrics.get("val_text_top_expert_share"))
    return metrics


def train(cfg: DictConfig) -> dict:
    """Train the model described by ``cfg`` (``conf/multimodal.yaml``); returns the metrics also
    written to ``metrics.json`` (the resolved ``config.yaml`` lands in the same directory)."""
    return fit(prepare(cfg))


# ----------------------------------------------------------------------------------- command line


def validate_config(cfg: DictConfig) -> None:
    """Check ``cfg`` (``conf/multimodal.yaml``) before any data is read or model built: the model
    target, architecture name and image size, the router, the data sources and sizes, the trainer;
    raises ``ConfigError`` naming the key."""
    m, d = cfg.model, cfg.data
    check_target("model._target_", m.get("_target_"), hint=": use model=<name> with a conf/model/multimodal config")
    if "model_name" in m:
        names = open_clip.list_models()
        if m.model_name not in names:
            local = sorted(n for n in names if n.startswith("mm-"))
            raise ConfigError("model.model_name", m.model_name,
                              f"use an open_clip architecture: this project's are {local}")
        size = (open_clip.get_model_config(m.model_name) or {}).get("vision_cfg", {}).get("image_size")
        if isinstance(size, int) and d.image_size != size:
            raise ConfigError("data.image_size", d.image_size,
                              f"model.model_name={m.model_name} takes {size}x{size} images: set data.image_size={size}")
    elif "patch_size" in m:
        check_int("model.patch_size", m.patch_size)
        check_int("data.image_size", d.image_size)
        if d.image_size % m.patch_size:
            raise ConfigError("data.image_size", d.image_size,
                              f"it must be a multiple of model.patch_size={m.patch_size} (the image is cut into patches)")
    num_experts = m.get("num_experts")
    if num_experts is not None:
        check_int("model.num_experts", num_experts)
        check_int("model.group_size", m.get("group_size"), optional=True)
        check_router(m.get("router"), num_experts, key="router", domain="multimodal", group_size=m.get("group_size"),
                     group_key="model.group_size")
    known = ("openmoji", "fashion_mnist")
    for key in ("sources", "val_sources"):
        for name in d.get(key) or []:
            if name not in known:
                raise ConfigError(f"data.{key}", list(d[key]), f"every source must be one of {list(known)}")
    if not d.sources:
        raise ConfigError("data.sources", [], f"give at least one of {list(known)}")
    if d.get("root") is not None:
        check_readable_dir("data.root", d.root, ": the folder with the Fashion-MNIST IDX .gz files, or null")
    check_int("data.batch_size", d.batch_size, minimum=2)  # a contrastive batch needs negatives
    check_int("data.eval_batch_size", d.eval_batch_size)
    for key in ("limit_train", "limit_eval", "fashion_mnist_train"):
        check_int(f"data.{key}", d.get(key), optional=True)
    check_int("threads", cfg.get("threads"), optional=True)
    check_trainer(cfg.trainer, num_experts)


def _row(cfg: DictConfig) -> dict:
    return {"router": cfg.get("router_name") or hydra_choice("router") or "default",
            "model": cfg.get("model_name") or hydra_choice("model") or "custom"}


@hydra.main(version_base="1.3", config_path="../conf", config_name="multimodal")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation contrastive loss. Config and data errors: one line, exit 2; a
    non-finite loss: exit 1; in a sweep, a router that cannot serve CLIP gets an n/a row."""
    return run_main(cfg, DOMAIN, validate=validate_config, prepare=prepare, fit=fit, out_dir=_out_dir, row=_row,
                    objective=lambda metrics: metrics.get("val_loss", float("nan")))


if __name__ == "__main__":
    main()
