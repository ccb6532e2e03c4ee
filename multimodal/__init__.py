"""CLIP-MoE and LIMoE on open_clip; importing the package registers the ``mm-*`` model JSON
(``multimodal/model_configs``) with open_clip, so ``open_clip.create_model("mm-clip-tiny-p4-32")`` works
and the ``*-MoE`` names build the MoE models their JSON describes (``multimodal.factory``):
``open_clip.create_model("mm-clip-tiny-p4-32-MoE")`` (CLIP-MoE), ``"mm-limoe-tiny-p4-32-MoE"`` (LIMoE)."""

from multimodal.models import (
    LIMoE, convert_clip_to_moe, create_clip, create_clip_moe, create_limoe, modality_usage, register_model_configs,
    upcycle_clip,
)

register_model_configs()

__all__ = ["LIMoE", "convert_clip_to_moe", "create_clip", "create_clip_moe", "create_limoe", "modality_usage",
           "register_model_configs", "upcycle_clip"]
