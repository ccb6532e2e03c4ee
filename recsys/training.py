"""The parts of a recsys run that ``recsys.train.RecsysTask`` puts together: the config checks, the
dataset, the torchrec embedding tables and the model, the loss and the evaluation.

- loss: BCE with logits for binary tasks, MSE for regression, summed over tasks with ``task_weights``
  (PLE Eq. 8 with static weights; the engine adds the gates' auxiliary losses);
- evaluation, per task: AUC (torchmetrics) and log loss for binary tasks, MSE for regression; their
  means over tasks (``auc_mean``, ``mse_mean``); the gates' expert utilisation (``gates``, ``gate_*``).
"""

from __future__ import annotations

from typing import Sequence

import hydra
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.classification import binary_auroc
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from core.checks import ConfigError, check_int, check_number, check_readable_dir, check_target, check_whole_groups
from core.runs import hydra_choice
from core.validate import check_router
from recsys.data import MultiTaskBatch, MultiTaskDataset, TaskSpec
from recsys.models import gate_stats, reset_gate_stats
from recsys.sharding import check_sharding

__all__ = ["build_dataset", "build_embedding_collection", "build_model", "make_evaluate", "make_loss_fn",
           "task_loss", "validate_config"]


# ------------------------------------------------------------------------------------- validation

# the files a loader with a ``path`` reads from it (or their .gz)
_DATA_FILES = {"recsys.data.load_census_kdd": ("census-income.data", "census-income.test")}

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


def validate_config(cfg: DictConfig) -> int | None:
    """Check the recsys keys of ``cfg`` before any data is read: the model and data targets, the
    experts and the gate router, the model against the data's task kinds, data paths and sizes, task
    weights, sharding; raises ``ConfigError`` naming the key. Returns the experts a gate mixes (None
    for a model without gates); ``core.run`` checks seed, threads and the trainer."""
    m, d = cfg.model, cfg.data
    model_cls = check_target("model._target_", m.get("_target_"), torch.nn.Module,
                             ": use model=<name> with a conf/recsys/model config")
    counts = _gate_expert_counts(m)
    gate = None
    if counts is not None:
        try:
            gate = check_router(m.gate, counts, key="router", domain="recsys")
        except ConfigError as err:
            if err.key == "router.num_experts":  # the gate's weights would not fit: the model's key is at fault
                key = "model.num_experts" if "num_experts" in m else "model.num_task_experts"
                raise ConfigError(key, m.get(key.split(".")[1]), err.allowed) from None
            raise
    _check_sizes(m, d)
    check_int("model.embedding_dim", m.get("embedding_dim", 8))
    check_target("data.dataset._target_", d.dataset.get("_target_"), hint=": use data=<name> with a conf/recsys/data config")
    if "path" in d.dataset:
        root = check_readable_dir("data.path", d.dataset.path, ": the directory holding the data files "
                                  "(census-income.data and census-income.test for census_kdd)")
        needed = _DATA_FILES.get(str(d.dataset.get("_target_")), ())
        missing = [f for f in needed if not any((root / name).is_file() for name in (f, f + ".gz"))]
        if missing:
            raise ConfigError("data.path", str(d.dataset.path), f"the directory lacks {missing} (or .gz): give the "
                              f"directory holding {list(needed)}")
    kinds = _task_kinds(d)
    if getattr(model_cls, "requires_binary_tasks", False) and kinds is not None and "binary" not in kinds:
        raise ConfigError("model", hydra_choice("model") or model_cls.__name__,
                          f"{model_cls.__name__} models a click -> conversion funnel of binary tasks, and "
                          f"this data has {kinds[0]} tasks; use data=adult, data=movielens or data=census_kdd")
    check_int("data.batch_size", d.batch_size)
    for key in ("eval_batch_size", "limit_train", "limit_eval"):
        check_int(f"data.{key}", d.get(key), optional=True)
    if gate is not None and gate.eval_group_dependent and m.get("routing_group_size") is not None:
        # recsys.models cuts batches into groups of routing_group_size examples; a gate that decides per
        # example (softmax, dropless top-k: the default gate is None) gives the same output in any group
        check_whole_groups("data.eval_batch_size", d.get("eval_batch_size") or d.batch_size,
                           "model.routing_group_size", m.routing_group_size)
    for i, w in enumerate(cfg.get("task_weights") or []):
        check_number(f"task_weights[{i}]", w, ge=0)
    if check_sharding(cfg.get("sharding")) is not None and cfg.trainer.get("data_parallel") == "fsdp":
        raise ConfigError("trainer.data_parallel", "fsdp", f"sharding={cfg.sharding} spreads the embedding tables "
                          "with torchrec, whose own DDP wrapper takes the dense part; use trainer.data_parallel=ddp "
                          "with it, or sharding=null with fsdp")
    return counts[0] if counts else None


def _check_sizes(m: DictConfig, d: DictConfig) -> None:
    """The model's layer sizes and the data loader's numbers, named as config keys (the builders'
    own checks name only their arguments)."""
    for key in m:
        if str(key).endswith("_layer_sizes"):
            sizes = m[key]
            if not OmegaConf.is_list(sizes) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                       for v in sizes):
                shown = OmegaConf.to_container(sizes) if OmegaConf.is_config(sizes) else sizes
                raise ConfigError(f"model.{key}", shown, "a list of layer widths, each an integer >= 1 ([] for none)")
        elif str(key) in ("expert_hidden_features", "expert_out_features"):
            check_int(f"model.{key}", m[key])
    ds = d.dataset
    for key in ("val_fraction", "test_fraction"):
        if key in ds:
            check_number(f"data.dataset.{key}", ds[key], gt=0)
            if not ds[key] < 1:
                raise ConfigError(f"data.dataset.{key}", ds[key], "it must lie in (0, 1)")
    if "val_fraction" in ds and "test_fraction" in ds and not ds.val_fraction + ds.test_fraction < 1:
        raise ConfigError("data.dataset.test_fraction", ds.test_fraction, f"with val_fraction={ds.val_fraction} "
                          "nothing would be left to train on: the two must sum to less than 1")
    if "correlation" in ds:
        check_number("data.dataset.correlation", ds.correlation)
        if not -1 <= ds.correlation <= 1:
            raise ConfigError("data.dataset.correlation", ds.correlation, "it must lie in [-1, 1] (a cosine)")
    for key in ("num_train", "num_val", "num_test", "dim", "num_sines"):
        if key in ds:
            check_int(f"data.dataset.{key}", ds[key])
    if "noise_std" in ds:
        check_number("data.dataset.noise_std", ds.noise_std, ge=0)
    if "scale" in ds:
        check_number("data.dataset.scale", ds.scale)


# ------------------------------------------------------------------------------- data and model


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
    the embedding tables; every other key but ``default_router`` (``core.run``'s) goes to the model
    class, whose ``gate`` reads the top-level ``router`` node (null: the dense softmax gate)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    embedding_dim = model_cfg.pop("embedding_dim", 8)
    model_cfg.pop("default_router", None)
    factory = hydra.utils.instantiate(model_cfg, _partial_=True)
    model = factory(embedding_bag_collection=build_embedding_collection(dataset, embedding_dim),
                    dense_in_features=len(dataset.dense_features), num_tasks=len(dataset.tasks))
    if getattr(model, "requires_binary_tasks", False) and any(t.kind != "binary" for t in dataset.tasks):
        kinds = {t.name: t.kind for t in dataset.tasks}
        raise ValueError(f"model {type(model).__name__} needs binary tasks (a click -> conversion funnel); "
                         f"data {dataset.name} has {kinds}.")
    return model


# ---------------------------------------------------------------------------- loss and evaluation


def _task_weights(tasks: Sequence[TaskSpec], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(tasks)
    weights = list(weights)
    if len(weights) != len(tasks) or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
        raise ValueError(f"task_weights={weights!r} is not allowed: give {len(tasks)} numbers >= 0, one per task "
                         f"({[t.name for t in tasks]}).")
    return [float(w) for w in weights]


def task_loss(out_B: torch.Tensor, label_B: torch.Tensor, kind: str, reduction: str = "mean") -> torch.Tensor:
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out_B, label_B, reduction=reduction)
    return F.mse_loss(out_B, label_B, reduction=reduction)


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
