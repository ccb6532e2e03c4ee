"""Train a multi-task recommender on the shared engine (``core.engine``).

``python -m recsys.train`` trains MMoE (dense softmax gates) on UCI Adult; ``model=ple``,
``data=synthetic``, ``+router=topk`` (any ``conf/router/*.yaml`` as every gate) swap the parts;
``experiment=mmoe_synthetic`` is the MMoE paper's synthetic sweep (correlation × model × seed).

The domain supplies the model, the loaders, the loss (BCE with logits for binary tasks, MSE for
regression, summed over tasks with ``task_weights``; the engine adds the gates' auxiliary losses) and
the evaluation (per task: AUC with torchmetrics and log loss for binary tasks, MSE for regression;
their means over tasks). ``metrics.json`` names the router, model and data (Hydra's runtime choices),
and holds ``<split>_<task>_auc`` / ``<split>_<task>_mse`` for the validation and test splits, plus the
gates' expert utilisation (``gates``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.classification import binary_auroc
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from core.cli import run_main
from core.distributed import is_main_process
from core.engine import Trainer, TrainerConfig, seed_everything
from core.runs import hydra_choice, run_dir
from core.checks import ConfigError, check_int, check_number, check_readable_dir, check_target
from core.validate import check_router, check_trainer
from recsys.data import MultiTaskBatch, MultiTaskDataset, TaskSpec, make_loader
from recsys.models import GateError, gate_stats, mixtures, reset_gate_stats
from recsys.sharding import check_sharding, shard_embedding_tables

log = logging.getLogger(__name__)

__all__ = ["build_dataset", "build_embedding_collection", "build_model", "main", "make_evaluate", "make_loss_fn",
           "train", "validate_config"]


# ----------------------------------------------------------------------------------------- pieces


def build_dataset(cfg: DictConfig) -> MultiTaskDataset:
    """The dataset of ``cfg.data.dataset`` (a ``_target_`` loader of ``recsys.data``); the loader's own
    ``FileNotFoundError``/``ValueError`` (e.g. a missing ``data.path``) reaches the user unwrapped."""
    try:
        return hydra.utils.instantiate(cfg.data.dataset)
    except InstantiationException as err:
        if isinstance(err.__cause__, (FileNotFoundError, ValueError)):
            raise err.__cause__
        raise


def build_embedding_collection(dataset: MultiTaskDataset, embedding_dim: int) -> EmbeddingBagCollection | None:
    """One torchrec table per sparse feature (``t_<feature>``), or None when there are none."""
    if not dataset.sparse_features:
        return None
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"model.embedding_dim={embedding_dim!r} is not allowed: it must be an integer >= 1.")
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    tables = [EmbeddingBagConfig(num_embeddings=f.num_embeddings, embedding_dim=embedding_dim, name=f"t_{f.name}",
                                 feature_names=[f.name], pooling=pooling[f.pooling])
              for f in dataset.sparse_features]
    return EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))


def build_model(cfg: DictConfig, dataset: MultiTaskDataset) -> torch.nn.Module:
    """The model of ``cfg.model`` for ``dataset``'s features and tasks. ``cfg.model.embedding_dim`` sizes
    the embedding tables; every other key goes to the model class (its ``gate`` reads the top-level
    ``router`` group, null meaning the dense softmax gate)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    embedding_dim = model_cfg.pop("embedding_dim", 8)
    factory = hydra.utils.instantiate(model_cfg, _partial_=True)
    model = factory(embedding_bag_collection=build_embedding_collection(dataset, embedding_dim),
                    dense_in_features=len(dataset.dense_features), num_tasks=len(dataset.tasks))
    if getattr(model, "requires_binary_tasks", False) and any(t.kind != "binary" for t in dataset.tasks):
        kinds = {t.name: t.kind for t in dataset.tasks}
        raise ValueError(f"model {type(model).__name__} needs binary tasks (a click -> conversion funnel); "
                         f"data {dataset.name} has {kinds}.")
    return model


def _task_weights(tasks: Sequence[TaskSpec], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(tasks)
    weights = list(weights)
    if len(weights) != len(tasks) or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
        raise ValueError(f"task_weights={weights!r} is not allowed: give {len(tasks)} numbers >= 0, one per task "
                         f"({[t.name for t in tasks]}).")
    return [float(w) for w in weights]


def make_loss_fn(tasks: Sequence[TaskSpec], task_weights: Sequence[float] | None = None):
    """``loss_fn(model, batch) -> (Σ_k w_k L_k, {"loss_<task>": L_k})`` with BCE-with-logits for binary
    tasks and MSE for regression tasks (PLE Eq. 8 with static weights)."""
    weights = _task_weights(tasks, task_weights)
    kinds = [t.kind for t in tasks]
    names = [t.name for t in tasks]

    def loss_fn(model: torch.nn.Module, batch: MultiTaskBatch):
        out_BK = model(batch.dense_features, batch.sparse_features).float()
        losses = [task_loss(out_BK[:, k], batch.labels[:, k], kind) for k, kind in enumerate(kinds)]
        total = sum(w * l for w, l in zip(weights, losses))
        return total, {f"loss_{n}": float(l.detach()) for n, l in zip(names, losses)}

    return loss_fn


def task_loss(out_B: torch.Tensor, label_B: torch.Tensor, kind: str, reduction: str = "mean") -> torch.Tensor:
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out_B, label_B, reduction=reduction)
    return F.mse_loss(out_B, label_B, reduction=reduction)


def make_evaluate(tasks: Sequence[TaskSpec]):
    """``evaluate(model, batches) -> metrics``: per task ``<task>_auc`` and ``<task>_logloss`` (binary)
    or ``<task>_mse`` (regression); ``auc_mean`` / ``mse_mean`` over tasks; ``loss`` (sum of task
    losses); the gates' statistics over these batches (``gates``, ``gate_load_cv2``,
    ``gate_experts_per_example``, ``gate_dropped_fraction``)."""

    @torch.no_grad()
    def evaluate(model: torch.nn.Module, batches) -> dict:
        reset_gate_stats(model)
        outs, labels = [], []
        for batch in batches:
            outs.append(model(batch.dense_features, batch.sparse_features).float())
            labels.append(batch.labels.float())
        if not outs:
            return {}
        out_NK, y_NK = torch.cat(outs), torch.cat(labels)
        res: dict = {}
        total = 0.0
        aucs, mses = [], []
        for k, t in enumerate(tasks):
            loss = float(task_loss(out_NK[:, k], y_NK[:, k], t.kind))
            total += loss
            if t.kind == "binary":
                res[f"{t.name}_logloss"] = loss
                y = y_NK[:, k].long()
                auc = float(binary_auroc(out_NK[:, k], y)) if 0 < int(y.sum()) < y.numel() else float("nan")
                res[f"{t.name}_auc"] = auc
                aucs.append(auc)
            else:
                res[f"{t.name}_mse"] = loss
                mses.append(loss)
        res["loss"] = total
        if aucs:
            res["auc_mean"] = sum(aucs) / len(aucs)
        if mses:
            res["mse_mean"] = sum(mses) / len(mses)
        stats = gate_stats(model, reset=True)
        if stats["gates"]:
            res["gates"] = stats["gates"]
            for key in ("load_cv2", "experts_per_example", "dropped_fraction"):
                res[f"gate_{key}"] = stats[key]
        return res

    return evaluate


def _choice_name(choice: str | None) -> str | None:
    return None if choice is None else choice.rsplit("/", 1)[-1]


def router_label(cfg: DictConfig, model: torch.nn.Module | None = None) -> str:
    """The run's router name: ``router_name``, else ``none`` for a model without gates (Single-Task,
    Shared-Bottom, ESMM), else the ``+router=`` choice, else ``dense`` (the papers' softmax gate)."""
    if cfg.get("router_name"):
        return str(cfg.router_name)
    if model is not None and not mixtures(model):
        return "none"
    if cfg.get("router") is None:
        return "dense"
    return hydra_choice("router") or str(cfg.router.get("_target_", "custom")).rsplit(".", 1)[-1]


def _out_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg.get("out_dir"))


# ------------------------------------------------------------------------------------------ train


@dataclasses.dataclass
class Prepared:
    """A run ready to train: what ``prepare`` builds and ``fit`` consumes."""
    cfg: DictConfig
    out_dir: Path
    dataset: Any
    model: torch.nn.Module
    trainer: Trainer
    train_loader: Any
    eval_loaders: dict
    restore_threads: int


def prepare(cfg: DictConfig) -> Prepared:
    """Read the data and build the model and the trainer of ``cfg`` (``conf/recsys.yaml``); its errors
    are configuration or data errors. Writes the resolved ``config.yaml`` into the run directory."""
    out_dir = _out_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.get("num_threads"):
        # these models are small: one thread per run avoids oversubscription (sweeps run runs side by side)
        torch.set_num_threads(int(cfg.num_threads))
    try:
        seed_everything(int(cfg.seed))
        d = cfg.data
        dataset = build_dataset(cfg)
        train_split = dataset.train.head(d.get("limit_train"))
        eval_splits = {"val": dataset.val.head(d.get("limit_eval")), "test": dataset.test.head(d.get("limit_eval"))}
        train_loader = make_loader(train_split, int(d.batch_size), shuffle=True,
                                   drop_last=len(train_split) > d.batch_size)
        eval_bs = int(d.get("eval_batch_size") or d.batch_size)
        eval_loaders = {name: make_loader(split, eval_bs) for name, split in eval_splits.items()}
        model = build_model(cfg, dataset)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        trainer_cfg = TrainerConfig.from_mapping(OmegaConf.to_container(cfg.trainer, resolve=True))
        # under torchrun: embedding tables spread over the ranks by torchrec (no-op in one process)
        model = shard_embedding_tables(model, cfg.get("sharding"), trainer_cfg.lr, trainer_cfg.eps)
        info = {
            "domain": "recsys",
            "router": router_label(cfg, model),
            "model": cfg.get("model_name") or _choice_name(hydra_choice("model")) or type(model).__name__,
            "data": dataset.name,
            "tasks": {t.name: t.kind for t in dataset.tasks},
            "data_info": dataset.info,
            "train_examples": len(train_split),
        }
        trainer = Trainer(trainer_cfg, out_dir, seed=int(cfg.seed), info=info)
    except BaseException:
        torch.set_num_threads(threads)
        raise
    log.info("recsys: model=%s router=%s data=%s, %d parameters, %d training examples",
             info["model"], info["router"], dataset.name, sum(p.numel() for p in model.parameters()), len(train_split))
    return Prepared(cfg, out_dir, dataset, model, trainer, train_loader, eval_loaders, threads)


def fit(p: Prepared) -> dict:
    """Train a prepared run and return the metrics written to ``metrics.json``."""
    try:
        metrics = p.trainer.fit(p.model, p.train_loader, make_loss_fn(p.dataset.tasks, p.cfg.get("task_weights")),
                                make_evaluate(p.dataset.tasks), eval_loaders=p.eval_loaders, count_examples=len)
    finally:
        torch.set_num_threads(p.restore_threads)
    # the engine's routing columns count core MoE layers; here the gated stages are the mixtures
    for key, ours in (("load_cv2", "val_gate_load_cv2"), ("experts_per_token", "val_gate_experts_per_example"),
                      ("dropped_fraction", "val_gate_dropped_fraction")):
        if metrics.get(key) is None and ours in metrics:
            metrics[key] = metrics[ours]
    if is_main_process():
        (p.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                        if k.startswith("test_") and isinstance(v, float) and not k.endswith("_per_s"))
    log.info("recsys: %s", summary)
    return metrics


def train(cfg: DictConfig) -> dict:
    """Train the model of ``cfg`` (``conf/recsys.yaml``) and return the metrics written to
    ``metrics.json`` (the resolved ``config.yaml`` lands next to it)."""
    return fit(prepare(cfg))


# ------------------------------------------------------------------------------------- validation

# data loaders whose tasks are regressions (every other loader of recsys.data yields binary tasks)
_REGRESSION_LOADERS = ("recsys.data.make_synthetic",)


def _gate_expert_counts(m: DictConfig) -> list[int] | None:
    """The number of experts each gate of the model mixes (None: the model has no gates)."""
    if "gate" not in m:
        return None
    if "num_experts" in m:
        check_int("model.num_experts", m.num_experts)
        return [m.num_experts]
    check_int("model.num_task_experts", m.get("num_task_experts"))
    check_int("model.num_shared_experts", m.get("num_shared_experts"), minimum=0)
    return [m.num_task_experts + m.num_shared_experts]


def _task_kinds(d: DictConfig) -> list[str] | None:
    target = str(d.dataset.get("_target_", ""))
    if "task_kinds" in d.dataset:
        return list(d.dataset.task_kinds)
    if target in _REGRESSION_LOADERS:
        return ["regression"]
    return ["binary"] if target.startswith("recsys.data.") else None


def validate_config(cfg: DictConfig) -> None:
    """Check ``cfg`` (``conf/recsys.yaml``) before any data is read: the model and data targets, the
    experts and the gate router, the model against the data's task kinds, data paths and sizes, the
    trainer; raises ``ConfigError`` naming the key."""
    m, d = cfg.model, cfg.data
    model_cls = check_target("model._target_", m.get("_target_"), torch.nn.Module,
                             ": use model=<name> with a conf/model/recsys config")
    counts = _gate_expert_counts(m)
    if counts is not None:
        check_router(m.gate, counts, key="router", domain="recsys")
    check_int("model.embedding_dim", m.get("embedding_dim", 8))
    check_target("data.dataset._target_", d.dataset.get("_target_"), hint=": use data=<name> with a conf/data/recsys config")
    if "path" in d.dataset:
        check_readable_dir("data.path", d.dataset.path, ": the directory holding the data files "
                           "(census-income.data and census-income.test for census_kdd)")
    kinds = _task_kinds(d)
    if getattr(model_cls, "requires_binary_tasks", False) and kinds is not None and "binary" not in kinds:
        raise ConfigError("model", hydra_choice("model") or model_cls.__name__,
                          f"{model_cls.__name__} models a click -> conversion funnel of binary tasks, and "
                          f"this data has {kinds[0]} tasks; use data=adult, data=movielens or data=census_kdd")
    check_int("data.batch_size", d.batch_size)
    for key in ("eval_batch_size", "limit_train", "limit_eval"):
        check_int(f"data.{key}", d.get(key), optional=True)
    for i, w in enumerate(cfg.get("task_weights") or []):
        check_number(f"task_weights[{i}]", w, ge=0)
    check_int("num_threads", cfg.get("num_threads"), optional=True)
    check_sharding(cfg.get("sharding"))
    check_trainer(cfg.trainer, counts[0] if counts else None)


def _row(cfg: DictConfig) -> dict:
    return {"router": router_label(cfg), "model": cfg.get("model_name") or _choice_name(hydra_choice("model"))}


def _objective(metrics: dict) -> float:
    if "val_mse_mean" in metrics:
        return metrics["val_mse_mean"]
    return 1.0 - metrics.get("val_auc_mean", float("nan"))


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="recsys")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation objective (mean MSE for regression data, 1 - mean AUC otherwise) for
    sweepers. Config and data errors: one line, exit 2; a non-finite loss: exit 1. In a multirun, a
    router that cannot serve as a gate gets an ``n/a`` metrics.json."""
    return run_main(cfg, "recsys", validate=validate_config, prepare=prepare, fit=fit, out_dir=_out_dir, row=_row,
                    not_applicable=(GateError,), objective=_objective)


if __name__ == "__main__":
    main()
