"""Train a V-MoE (or its dense ViT baseline) image classifier: ``python -m vision.train [overrides]``.

The domain's part of a run (``core.run``): the image data, the timm model (``vmoe_*``, registered by
``import vision``), cross-entropy, and top-1 accuracy. See ``conf/vision/train.yaml`` for the usual
overrides.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from core.analytics import example_labels, position_labels
from core.run import AnalysisInputs, Task, TaskRun, command_line, run
from vision.data import build_loaders, load_dataset
from vision.training import build_model, classification_loss, evaluate_classifier, validate_config

__all__ = ["VisionTask", "build_model", "main"]


class VisionTask(Task):
    """Image classification with a V-MoE (or the dense ViT): top-1 accuracy on the test split."""

    name, metric, higher_is_better, unit = "vision", "test_acc", True, "image"

    def validate(self, cfg: DictConfig) -> int | None:
        return validate_config(cfg)

    def load_data(self, cfg: DictConfig):
        d = cfg.data
        return load_dataset(d.name, d.root, d.download, d.img_size, d.system_dir, d.train_dir, d.test_dir)

    def build(self, cfg: DictConfig, data) -> TaskRun:
        d, m = cfg.data, cfg.model
        train_loader, test_loader = build_loaders(data, d.batch_size, d.eval_batch_size, d.augment, d.crop_padding,
                                                  d.limit_train, d.limit_eval)
        model = build_model(cfg, data)
        info = {"model": m.name if m.moe else f"{m.name} (dense)", "moe_blocks": list(getattr(model, "moe_blocks", [])),
                "num_experts": m.num_experts if m.moe else 0, "dataset": d.name,
                "train_examples": train_loader.num_examples, "test_examples": test_loader.num_examples}
        return TaskRun(model, train_loader, {"test": test_loader}, classification_loss, evaluate_classifier, info)

    def analysis_inputs(self, cfg: DictConfig, task_run: TaskRun) -> AnalysisInputs:
        """The routing analyses on the test images: a token's label is its patch position (and its
        image's class)."""
        def forward(model, batch):
            model(batch[0].to(next(model.parameters()).device))

        return AnalysisInputs(task_run.eval_loaders["test"], forward,
                              lambda batch: {"position": position_labels, "class": example_labels(batch[1])})

    def summary(self, metrics) -> list[str]:
        return [f"  test accuracy   {100 * metrics['test_acc']:.2f}%  (test loss {metrics['test_loss']:.4f})"]


@hydra.main(config_path="pkg://conf/vision", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, VisionTask())


if __name__ == "__main__":
    command_line(main)
