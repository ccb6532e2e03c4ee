"""Train a multi-task recommender: ``python -m recsys.train [overrides]``.

MMoE (dense softmax gates) on UCI Adult by default; ``model=ple``, ``data=synthetic``, ``+router=topk``
(any ``conf/router/*.yaml`` as every gate) swap the parts; ``experiment=mmoe_synthetic`` is the MMoE
paper's synthetic sweep (correlation × model × seed). See ``conf/recsys/train.yaml``.

The domain's part of a run (``core.run``): the data, the torchrec model (its tables sharded under
torchrun with ``sharding=``), and the loss and evaluation of ``recsys.training``. ``metrics.json``
holds ``<split>_<task>_auc`` and ``_logloss`` (binary tasks) or ``<split>_<task>_mse`` (regression)
for the ``val`` and ``test`` splits, their means over tasks, and the gates' expert utilisation
(``<split>_gates``, whose validation means fill the routing columns ``load_cv2``,
``experts_per_token``, ``dropped_fraction``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from core.engine import TrainerConfig
from core.run import Task, TaskRun, command_line, run
from core.runs import hydra_choice
from recsys.data import MultiTaskDataset, make_loader
from recsys.models import GateError
from recsys.sharding import shard_embedding_tables
from recsys.training import build_dataset, build_model, make_evaluate, make_loss_fn, validate_config

__all__ = ["RecsysTask", "main"]

# the engine's routing columns count core MoE layers; here the gated stages are the mixtures, whose
# statistics over the validation split stand in for them
GATE_COLUMNS = {"load_cv2": "val_gate_load_cv2", "experts_per_token": "val_gate_experts_per_example",
                "dropped_fraction": "val_gate_dropped_fraction"}
# (task kind, summary label, metric suffix)
QUALITY = (("binary", "AUC", "auc"), ("regression", "MSE", "mse"))


class RecsysTask(Task):
    """Multi-task recommendation. Headline metric: the test AUC averaged over the binary tasks; for
    regression data (the synthetic experiment) the test MSE averaged over tasks, lower being better
    (``finish`` records which one in ``metrics.json``)."""

    name, metric, higher_is_better, unit = "recsys", "test_auc_mean", True, "example"
    not_applicable = (GateError,)

    def validate(self, cfg: DictConfig) -> int | None:
        return validate_config(cfg)

    def load_data(self, cfg: DictConfig) -> MultiTaskDataset:
        return build_dataset(cfg)

    def build(self, cfg: DictConfig, data: MultiTaskDataset) -> TaskRun:
        d = cfg.data
        train_split = data.train.head(d.get("limit_train"))
        train_loader = make_loader(train_split, int(d.batch_size), shuffle=True,
                                   drop_last=len(train_split) > d.batch_size)
        eval_bs = int(d.get("eval_batch_size") or d.batch_size)
        eval_loaders = {name: make_loader(split.head(d.get("limit_eval")), eval_bs)
                        for name, split in (("val", data.val), ("test", data.test))}
        model = build_model(cfg, data)
        # under torchrun: embedding tables spread over the ranks by torchrec (no-op in one process);
        # table- and column-wise tables train with a fused Adagrad at the trainer's lr and eps
        trainer = TrainerConfig.from_mapping(OmegaConf.to_container(cfg.trainer, resolve=True))
        model = shard_embedding_tables(model, cfg.get("sharding"), trainer.lr, trainer.eps)
        choice = (hydra_choice("model") or "").rsplit("/", 1)[-1]
        info = {"model": cfg.get("model_name") or choice or type(model).__name__, "data": data.name,
                "tasks": {t.name: t.kind for t in data.tasks}, "data_info": data.info,
                "train_examples": len(train_split), "dataset": data.name}
        return TaskRun(model, train_loader, eval_loaders, make_loss_fn(data.tasks, cfg.get("task_weights")),
                       make_evaluate(data.tasks), info, count_examples=len)

    def finish(self, cfg: DictConfig, task_run: TaskRun, metrics: dict) -> None:
        for key, ours in GATE_COLUMNS.items():
            if metrics.get(key) is None and ours in metrics:
                metrics[key] = metrics[ours]
        if self.metric not in metrics and "test_mse_mean" in metrics:  # regression tasks only
            metrics["metric"], metrics["higher_is_better"] = "test_mse_mean", False

    def summary(self, metrics) -> list[str]:
        def fmt(key):
            value = metrics.get(key)
            return "n/a" if value is None else f"{value:.4f}"

        lines = []
        for kind, label, suffix in QUALITY:
            tasks = [name for name, k in (metrics.get("tasks") or {}).items() if k == kind]
            if tasks:
                per_task = ", ".join(f"{t} {fmt(f'test_{t}_{suffix}')}" for t in tasks)
                lines.append(f"  {'test ' + label:<16}{fmt(f'test_{suffix}_mean')} mean ({per_task}); "
                             f"validation {fmt(f'val_{suffix}_mean')}")
        return lines

    def objective(self, metrics) -> float:
        """The validation mean MSE for regression data, else 1 - the validation mean AUC (minimised)."""
        if "val_mse_mean" in metrics:
            return metrics["val_mse_mean"]
        return 1.0 - metrics.get("val_auc_mean", float("nan"))


@hydra.main(config_path="pkg://conf/recsys", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, RecsysTask())


if __name__ == "__main__":
    command_line(main)
