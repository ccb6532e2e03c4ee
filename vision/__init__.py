"""V-MoE image classifiers on timm ViTs; importing the package registers the ``vmoe_*`` models with timm."""

from vision import models  # noqa: F401  (registers vmoe_* with timm)
from vision.models import create_vmoe, moe_layers

__all__ = ["create_vmoe", "models", "moe_layers"]
