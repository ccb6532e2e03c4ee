"""The package's training commands: ``moe-<domain>-train [overrides]`` is ``python -m <domain>.train
[overrides]`` (the same Hydra entry point, the same one-line errors: ``core.run.command_line``).

The domain's module is the one that holds its ``Task``, as registered in ``conf/<domain>/train.yaml``
(``task: vision.train.VisionTask``); it is imported when the command runs.
"""

from __future__ import annotations

import importlib

from core.run import command_line, task_paths

__all__ = ["multimodal_train", "nlp_train", "recsys_train", "train", "vision_train"]


def train(domain: str) -> None:
    """Run ``domain``'s ``@hydra.main`` entry point (its ``train`` module's ``main``) with the command
    line's overrides."""
    module = importlib.import_module(task_paths()[domain].rsplit(".", 1)[0])
    command_line(module.main)


def vision_train() -> None:
    """``moe-vision-train``: ``python -m vision.train``."""
    train("vision")


def recsys_train() -> None:
    """``moe-recsys-train``: ``python -m recsys.train``."""
    train("recsys")


def multimodal_train() -> None:
    """``moe-multimodal-train``: ``python -m multimodal.train``."""
    train("multimodal")


def nlp_train() -> None:
    """``moe-nlp-train``: ``python -m nlp.train``."""
    train("nlp")
